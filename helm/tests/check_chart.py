#!/usr/bin/env python3
"""Offline checks of the floe Helm chart.

For the default values and every file in helm/floe/ci/:
  1. `helm lint` and `helm template` succeed;
  2. every rendered manifest validates (strictly: no unknown fields) against
     the Kubernetes OpenAPI schemas of the oldest and newest supported
     Kubernetes versions (kubernetes-validate, offline);
  3. every container that runs the floe image is started as the real
     `floe` binary with the same arguments and environment (secrets and
     volumes materialised in a temporary folder) and `--check-config`, so
     the chart can never pass a flag or value the binary rejects.
Then values the schema or the templates must refuse are rendered and must
fail, and a value only the binary can refuse must make check 3 fail.

Usage: check_chart.py HELM FLOE_BINARY
"""

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent.parent / "floe"
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Kinds from the Prometheus Operator: no schema in the Kubernetes API.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
POD_TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
FIELD_VALUES = {
    "metadata.name": "rel-floe-component-7d9f8-x2k4p",
    "metadata.namespace": "floe",
    "status.podIP": "10.1.2.3",
    "status.hostIP": "10.1.2.3",
}

failures = []


def fail(what):
    failures.append(what)
    print(f"  FAIL {what}", flush=True)


def helm(helm_bin, *args, check=True):
    result = subprocess.run(
        [helm_bin, *args], capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}:\n{result.stderr}")
    return result


def render(helm_bin, values_args):
    out = helm(helm_bin, "template", "rel", str(CHART), "-n", "floe", *values_args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs, label):
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in OPERATOR_KINDS:
            if not doc.get("spec"):
                fail(f"{label}: {name} has no spec")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{label}: {name} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def self_signed_pem(folder):
    """A throwaway certificate and key, for a mounted TLS Secret."""
    crt, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=turn.example.com", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=60,
    )
    return {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes()}


def secret_data(docs, name, scratch):
    """The data of Secret `name`: rendered by the chart, or a stand-in with
    the keys the chart expects of an existing Secret."""
    for doc in docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            return {k: base64.b64decode(v) for k, v in doc.get("data", {}).items()}
    if "tls" in name or name.endswith("-ca"):
        folder = scratch / f"pem-{name}"
        folder.mkdir(exist_ok=True)
        pem = self_signed_pem(folder)
        return {**pem, "ca.crt": pem["tls.crt"]}
    return {
        "admin-token": b"existing-admin-token-0123456789",
        "internal-token": b"existing-internal-token-0123456789",
        "turn-secrets": b"k9=existing-turn-secret-0123456789\n",
        "redis-password": b"existing redis password",
        "password": b"existing redis password",
    }


def check_containers(docs, floe_bin, label, expect_ok=True):
    """Runs `floe <args> --check-config` for every floe container; returns
    how many were checked and how many the binary refused."""
    checked = refused = 0
    for doc in docs:
        if doc["kind"] not in POD_TEMPLATE_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            if "floe" not in container["image"]:
                continue
            checked += 1
            with tempfile.TemporaryDirectory(prefix="floe-chart-") as tmp:
                scratch = Path(tmp)
                mounts = {}
                for m in container.get("volumeMounts", []):
                    local = scratch / m["name"]
                    local.mkdir()
                    secret = volumes[m["name"]].get("secret")
                    if secret:
                        for key, value in secret_data(docs, secret["secretName"], scratch).items():
                            (local / key).write_bytes(value)
                    mounts[m["mountPath"]] = str(local)
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                for e in container.get("env", []):
                    if "value" in e:
                        value = e["value"]
                    elif "fieldRef" in e.get("valueFrom", {}):
                        value = FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
                    elif "secretKeyRef" in e.get("valueFrom", {}):
                        ref = e["valueFrom"]["secretKeyRef"]
                        value = secret_data(docs, ref["name"], scratch)[ref["key"]].decode()
                    else:
                        raise RuntimeError(f"{label}: unhandled env source {e}")
                    for path, local in mounts.items():
                        if value.startswith(path + "/"):
                            value = local + value[len(path):]
                    # $(NAME) of a variable defined above, as the kubelet
                    # expands it.
                    for name, defined in env.items():
                        value = value.replace(f"$({name})", defined)
                    env[e["name"]] = value
                args = container.get("command", [])[1:] + container.get("args", [])
                result = subprocess.run(
                    [floe_bin, *args, "--check-config"], env=env, cwd=scratch,
                    capture_output=True, text=True, timeout=60,
                )
                where = f"{label}: {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
                if result.returncode != 0:
                    refused += 1
                    if expect_ok:
                        fail(f"{where}: floe {' '.join(args)} --check-config refused it:\n{result.stderr.strip()}")
                elif expect_ok:
                    print(f"  ok   {where}: floe {' '.join(args)} --check-config", flush=True)
    if expect_ok and checked == 0:
        fail(f"{label}: no floe container found")
    return checked, refused


def check_alerts(docs, label):
    """Each component has an alert for being gone altogether (that the
    alerts read only metrics the components expose is checked against
    live components by tests/loadtest.rs)."""
    rules = [r for d in docs if d["kind"] == "PrometheusRule"
             for g in d["spec"]["groups"] for r in g["rules"]]
    if not rules:
        return
    absent = {r.get("labels", {}).get("component") for r in rules if "absent(" in r["expr"]}
    for component in ("signal", "control-plane", "turn"):
        if component not in absent:
            fail(f"{label}: no alert fires when every {component} pod is gone")
    print(f"  ok   {len(rules)} alerts, one for each component gone", flush=True)


def check_operator_values(docs, label):
    """ci/operator-values.yaml reaches every pod it names: mirror and
    digest, ServiceAccount, priority class, labels, no fixed UID, the extra
    volume, and TURN's spool on the node readied by an init container."""
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in POD_TEMPLATE_KINDS}
    accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    problems = []
    for name, template in pods.items():
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if not c["image"].startswith("registry.example.com/mirror/"):
                problems.append(f"{name}: image {c['image']} is not from the mirror")
            if "floe" in c["image"] and "@sha256:" not in c["image"]:
                problems.append(f"{name}: image {c['image']} is not pinned by digest")
        if spec.get("serviceAccountName") not in accounts:
            problems.append(f"{name}: service account {spec.get('serviceAccountName')} not among {accounts}")
        if spec.get("priorityClassName") != "floe-critical":
            problems.append(f"{name}: no priority class")
        if template["metadata"]["labels"].get("team") != "rtc":
            problems.append(f"{name}: no pod label")
        if "runAsUser" in spec.get("securityContext", {}):
            problems.append(f"{name}: a fixed UID in the pod security context")
        if spec.get("imagePullSecrets") != [{"name": "mirror-pull"}]:
            problems.append(f"{name}: no image pull secret")
    signal = next(t for n, t in pods.items() if n.endswith("-signal"))["spec"]
    if not any(v["name"] == "extra-ca" for v in signal["volumes"]) or not any(
            m["name"] == "extra-ca" for m in signal["containers"][0]["volumeMounts"]):
        problems.append("signal: the extra volume is not mounted")
    turn = next(t for n, t in pods.items() if n.endswith("-turn"))["spec"]
    data = next(v for v in turn["volumes"] if v["name"] == "data")
    if data.get("hostPath", {}).get("path") != "/var/lib/floe-turn":
        problems.append(f"turn: the spool is not on the node: {data}")
    init = turn.get("initContainers", [])
    if not init or init[0]["args"][:2] != ["turn-data-dir", "/var/lib/floe"] \
            or init[0]["securityContext"]["capabilities"] != {"drop": ["ALL"], "add": ["CHOWN"]}:
        problems.append(f"turn: no init container readying the spool: {init}")
    for p in problems:
        fail(f"{label}: {p}")
    if not problems:
        print(f"  ok   {label}: mirror, digest, ServiceAccount, priority, labels, platform UID, "
              f"extra volume and a node spool on all {len(pods)} workloads", flush=True)


def memory_bytes(quantity):
    """Bytes of a Kubernetes quantity (512Mi) or a Redis size (384mb)."""
    units = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "kb": 1024, "mb": 1024**2,
             "gb": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3, "b": 1}
    q = str(quantity).lower()
    for unit, factor in units.items():
        if q.endswith(unit):
            return int(q[: -len(unit)]) * factor
    return int(q)


def check_redis_memory(docs, label):
    """The in-chart Redis refuses writes before its container is killed
    for memory: maxmemory at most 80% of the limit, never evicting."""
    for doc in docs:
        if doc["kind"] != "StatefulSet" or not doc["metadata"]["name"].endswith("-redis"):
            continue
        container = doc["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        if "--maxmemory" not in args or limit is None:
            fail(f"{label}: the in-chart Redis has no maxmemory or no memory limit")
            continue
        maxmemory = memory_bytes(args[args.index("--maxmemory") + 1])
        policy = args[args.index("--maxmemory-policy") + 1] if "--maxmemory-policy" in args else None
        if maxmemory > 0.8 * memory_bytes(limit) or policy != "noeviction":
            fail(f"{label}: Redis maxmemory {maxmemory} B ({policy}) against a {limit} limit")
        else:
            print(f"  ok   {label}: Redis maxmemory {maxmemory >> 20} MiB, noeviction, limit {limit}")


def check_rotation(helm_bin):
    """Adding a TURN secret changes the checksum annotation of the control
    plane's pods only: TURN reads the file again by itself, signal and
    Redis never read it, so none of them restart."""
    fixed = ["--set", "secrets.adminToken=admin-token-0123456789",
             "--set", "secrets.internalToken=internal-token-0123456789",
             "--set", "redis.enabled=false", "--set", "redis.url=redis://redis.example:6379",
             "--set", "redis.password=redis-password-0123"]
    k1 = ["--set", "secrets.turnSecrets[0].kid=k1",
          "--set", "secrets.turnSecrets[0].secret=first-secret-0123456789"]
    k2 = ["--set", "secrets.turnSecrets[0].kid=k1",
          "--set", "secrets.turnSecrets[0].secret=first-secret-0123456789",
          "--set", "secrets.turnSecrets[1].kid=k2",
          "--set", "secrets.turnSecrets[1].secret=second-secret-0123456789"]

    def checksums(args):
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
                for d in render(helm_bin, fixed + args)
                if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")}

    before, after = checksums(k1), checksums(k2)
    changed = sorted(n for n in before if before[n] != after.get(n))
    if changed != ["rel-floe-control-plane"]:
        fail(f"adding a TURN secret restarts {changed}, not just the control plane")
    else:
        print(f"  ok   only {changed[0]} rolls; {len(before) - 1} workloads keep their pods", flush=True)


def check_docs():
    """The chart's version matches the binary's, and the README's values
    table names every value."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    cargo = (CHART.parent.parent / "Cargo.toml").read_text()
    workspace_version = cargo.split("[workspace.package]")[1].split('version = "')[1].split('"')[0]
    if chart["appVersion"] != workspace_version:
        fail(f"Chart appVersion {chart['appVersion']} is not the crates' version {workspace_version}")
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Values handed to Kubernetes whole are documented as one row.
    whole = {"podSecurityContext", "containerSecurityContext"}
    for top, value in values.items():
        nested = isinstance(value, dict) and value and top not in whole
        keys = [f"{top}.{k}" for k in value] if nested else [top]
        for key in keys:
            if f"`{key}" not in readme:
                fail(f"helm/floe/README.md does not document {key}")


def main():
    helm_bin, floe_bin = sys.argv[1], sys.argv[2]
    check_docs()
    shapes = [("default", [])] + [
        (p.stem, ["-f", str(p)]) for p in sorted((CHART / "ci").glob("*-values.yaml"))
    ]
    print(f"helm {helm(helm_bin, 'version', '--short').stdout.strip()}, "
          f"schemas for Kubernetes {', '.join(KUBE_VERSIONS)}")
    for label, args in shapes:
        print(f"== {label}", flush=True)
        lint = helm(helm_bin, "lint", str(CHART), *args, check=False)
        if lint.returncode != 0:
            fail(f"{label}: helm lint:\n{lint.stdout}{lint.stderr}")
            continue
        docs = render(helm_bin, args)
        print(f"  {len(docs)} manifests: "
              + ", ".join(sorted({d['kind'] for d in docs})), flush=True)
        validate(docs, label)
        check_alerts(docs, label)
        check_redis_memory(docs, label)
        if label == "operator-values":
            check_operator_values(docs, label)
        check_containers(docs, floe_bin, label)

    print("== a TURN secret rotation restarts only the control plane", flush=True)
    check_rotation(helm_bin)

    print("== values the chart must refuse", flush=True)
    refusals = {
        "negative signal replicas": ["--set", "signal.replicas=-1"],
        "negative control-plane replicas": ["--set", "controlPlane.replicas=-2"],
        "empty relay port range": ["--set", "turn.relayPorts.count=0"],
        "inverted relay port range": ["--set", "turn.relayPorts.count=-100"],
        "relay range past 65535": ["--set", "turn.relayPorts.first=65000,turn.relayPorts.count=1000"],
        "relay range as min/max": ["--set", "turn.relayPortMin=60000,turn.relayPortMax=50000"],
        "unknown TURN exposure mode": ["--set", "turn.exposure=ingress"],
        "load balancer without external IP": ["--set", "turn.exposure=loadBalancer,turn.kind=Deployment"],
        "several replicas on the embedded store": ["--set", "controlPlane.store=embedded,controlPlane.replicas=2"],
        "several signal nodes without Redis": ["--set", "redis.enabled=false"],
        "short TURN secret": ["--set", "secrets.turnSecrets[0].kid=k1,secrets.turnSecrets[0].secret=short"],
        "unknown top-level value": ["--set", "turnn.enabled=true"],
        "the web app without its tenant": ["--set", "signal.serveApp=true"],
        "a NetworkPolicy open to every address for host-network TURN": ["--set", "networkPolicy.enabled=true"],
        "generated secrets under GitOps (secrets.generate=false)": ["--set", "secrets.generate=false"],
        "a Redis URL of another scheme": ["--set", "redis.enabled=false,redis.url=unix:///run/redis.sock"],
        "a Redis CA for plain-text Redis": ["--set", "redis.enabled=false,redis.url=redis://r:6379,redis.caSecret=ca"],
        "Redis maxmemory that is not a size": ["--set", "redis.maxmemory=lots"],
        "a node spool where two TURN pods may share a node": ["--set", "turn.exposure=nodePort,turn.kind=Deployment,turn.relayPorts.first=31000,turn.relayPorts.count=100,turn.spoolHostPath=/var/lib/floe-turn"],
        "an image digest that is not sha256": ["--set", "image.digest=latest"],
    }
    for what, args in refusals.items():
        result = helm(helm_bin, "template", "rel", str(CHART), *args, check=False)
        if result.returncode == 0:
            fail(f"accepted: {what} ({' '.join(args[1:])})")
        else:
            lines = [l.strip() for l in result.stderr.splitlines()
                     if l.strip() and not l.startswith("Use --debug")]
            reason = "; ".join(l for l in lines if l.startswith("- ")) or lines[-1]
            print(f"  ok   refused {what}: {reason}", flush=True)

    print("== values only the binary can refuse", flush=True)
    docs = render(helm_bin, ["--set", "controlPlane.extraEnv[0].name=FLOE_CREDENTIAL_TTL_SECS",
                             "--set-string", "controlPlane.extraEnv[0].value=5"])
    checked, refused = check_containers(docs, floe_bin, "bad ttl", expect_ok=False)
    if refused != 1:
        fail(f"--check-config refused {refused} of {checked} containers; expected exactly the control plane")
    else:
        print(f"  ok   --check-config refused the control plane's FLOE_CREDENTIAL_TTL_SECS=5", flush=True)
    # A Sentinel URL without the master's name passes the schema; signal
    # and the control plane refuse it at start, not at their first write.
    docs = render(helm_bin, ["--set", "redis.enabled=false,redis.url=redis+sentinel://s0:26379"])
    checked, refused = check_containers(docs, floe_bin, "sentinel without master", expect_ok=False)
    if refused != 2:
        fail(f"--check-config refused {refused} of {checked} containers; expected signal and the control plane")
    else:
        print(f"  ok   --check-config refused redis+sentinel://s0:26379 (no master name) in signal and the control plane", flush=True)

    if failures:
        print(f"\n{len(failures)} chart check(s) failed", flush=True)
        return 1
    print("\nchart checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
