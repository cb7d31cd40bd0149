//! Liveness and readiness.
//!
//! A component registers one named [`Check`] per dependency (Redis, the
//! control plane, "not draining") and flips it from the task that knows.
//! `/readyz` is 200 only while every check passes; `/healthz` is 200 while
//! the process serves at all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The set of readiness checks of one component.
#[derive(Clone)]
pub struct Health {
    component: &'static str,
    checks: Arc<Mutex<BTreeMap<&'static str, Arc<AtomicBool>>>>,
}

/// One named readiness condition.
#[derive(Clone)]
pub struct Check(Arc<AtomicBool>);

impl Check {
    pub fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Health {
    /// The checks of `component` ("signal", "turn", "control-plane").
    pub fn new(component: &'static str) -> Self {
        Self {
            component,
            checks: Arc::default(),
        }
    }

    pub fn component(&self) -> &'static str {
        self.component
    }

    /// Registers (or returns the existing) check `name`, initially `ok`.
    pub fn check(&self, name: &'static str, ok: bool) -> Check {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let flag = checks
            .entry(name)
            .or_insert_with(|| Arc::new(AtomicBool::new(ok)));
        Check(flag.clone())
    }

    /// Every check and whether it passes.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn ready(&self) -> bool {
        self.snapshot().values().all(|ok| *ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let health = Health::new("test");
        assert!(health.ready());
        let redis = health.check("redis", false);
        let drain = health.check("serving", true);
        assert!(!health.ready());
        redis.set(true);
        assert!(health.ready());
        drain.set(false);
        assert!(!health.ready());
        assert_eq!(health.snapshot().get("serving"), Some(&false));
        // The same name returns the same flag.
        health.check("serving", true).set(true);
        assert!(health.ready());
    }
}
