//! Liveness and readiness.
//!
//! A component registers one named [`Check`] per dependency (Redis, the
//! control plane, "not draining") and flips it from the task that knows.
//! `/readyz` is 200 only while every check passes; `/healthz` is 200 while
//! every *vital* check passes: a part of the process that died and that
//! only a restart brings back (a TURN shard's thread), not a dependency
//! that may come back by itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The set of readiness checks of one component.
#[derive(Clone)]
pub struct Health {
    component: &'static str,
    checks: Arc<Mutex<BTreeMap<&'static str, Arc<AtomicBool>>>>,
    /// Names of the checks `/healthz` needs as well.
    vital: Arc<Mutex<Vec<&'static str>>>,
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
            vital: Arc::default(),
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

    /// Registers check `name` as vital: failing, it fails `/healthz`
    /// (the process should be restarted) as well as `/readyz`.
    pub fn vital(&self, name: &'static str, ok: bool) -> Check {
        let check = self.check(name, ok);
        let mut vital = self.vital.lock().unwrap_or_else(|e| e.into_inner());
        if !vital.contains(&name) {
            vital.push(name);
        }
        check
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

    /// The vital checks that fail (empty while the process is alive).
    pub fn dead(&self) -> Vec<&'static str> {
        let vital = self.vital.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let checks = self.snapshot();
        vital
            .into_iter()
            .filter(|name| checks.get(name) == Some(&false))
            .collect()
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
        assert!(health.dead().is_empty(), "no vital check");
    }

    #[test]
    fn a_failed_vital_check_fails_liveness_too() {
        let health = Health::new("test");
        let redis = health.check("redis", false);
        let shards = health.vital("shards", true);
        assert!(health.dead().is_empty(), "a dependency down is not death");
        redis.set(true);
        shards.set(false);
        assert_eq!(health.dead(), vec!["shards"]);
        assert!(!health.ready());
        assert!(!health.vital("shards", true).get(), "same flag");
    }
}
