//! Operator CLI (tenant/token/usage).
