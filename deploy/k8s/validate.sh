#!/usr/bin/env bash
# Validates the manifests offline (no cluster): `validate.sh [DIR]` (default: this directory).
#  1. Against the Kubernetes API schemas of the oldest and newest versions targeted, strictly
#     (unknown fields refused), with the PyPI package kubernetes-validate (it bundles them), in
#     a virtualenv in .state/k8s-venv.
#  2. Against the gateway: every port the config listens on (`[ingest] listen`, each core's
#     `core_port_base + i` for the pod's CPUs, `[admin] listen`) is a named container port the
#     headless Service publishes; readiness and liveness probes hit `/ready` and `/live` on the
#     admin port; the pod is Guaranteed (requests == limits, whole CPUs); IPC_LOCK is added;
#     the seccomp profile it names allows io_uring_setup, io_uring_enter and io_uring_register;
#     every `*_file` of the config lies in the mounted Secret, whose key exists; the grace
#     period is above `shutdown_deadline_ms`.
#  3. With SHARDGATE_BIN set: the ConfigMap's config passes `$SHARDGATE_BIN check`, the
#     Secret's values written in place of the mounted files.
# Used by the test suite (packaging.rs); runnable by hand.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$(cd "${1:-$here}" && pwd)"
venv="${SHARDGATE_STATE:-$repo/.state}/k8s-venv"
if [[ ! -x "$venv/bin/kubernetes-validate" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
for version in 1.30.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "$dir"/*.yaml
done
"$venv/bin/python" - "$dir" "${SHARDGATE_BIN:-}" <<'PY'
import json, os, re, subprocess, sys, tempfile, tomllib
import yaml

directory, binary = sys.argv[1], sys.argv[2]
docs = {}
for name in sorted(os.listdir(directory)):
    if name.endswith(".yaml"):
        for doc in yaml.safe_load_all(open(os.path.join(directory, name))):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
failures = []
def need(condition, message):
    if not condition:
        failures.append(message)

sts = docs[("StatefulSet", "shardgate")]
pod = sts["spec"]["template"]["spec"]
container = pod["containers"][0]
config_map = docs[("ConfigMap", "shardgate")]
config_text = config_map["data"]["shardgate.toml"]
config = tomllib.loads(config_text)
service = docs[("Service", sts["spec"]["serviceName"])]
need(service["spec"].get("clusterIP") == "None", "the StatefulSet's Service is not headless")
need(service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items(),
     "the Service does not select the pods")

resources = container["resources"]
need(resources.get("requests") == resources.get("limits"), "requests != limits: not Guaranteed QoS")
cpus = str(resources["limits"]["cpu"])
need(cpus.isdigit(), f"cpu {cpus!r} is not a whole number: no exclusive CPUs")
cpus = int(cpus) if cpus.isdigit() else 0

container_ports = {p["containerPort"]: p["name"] for p in container["ports"]}
service_ports = {p["targetPort"] for p in service["spec"]["ports"]}
def port_of(listen):
    return int(listen.rsplit(":", 1)[1])
listening = [port_of(config["ingest"]["listen"]), port_of(config["admin"]["listen"])]
listening += [config["ingest"]["core_port_base"] + i for i in range(cpus)]
for port in listening:
    name = container_ports.get(port)
    need(name is not None, f"port {port} the gateway listens on is not a container port")
    need(name in service_ports, f"port {port} ({name}) is not published by the Service")
admin = container_ports.get(port_of(config["admin"]["listen"]))
for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
    get = container.get(probe, {}).get("httpGet", {})
    need(get.get("path") == path and get.get("port") == admin, f"{probe} is not {path} on the admin port")
need("IPC_LOCK" in container["securityContext"]["capabilities"].get("add", []), "IPC_LOCK is not added")
deadline_s = config.get("runtime", {}).get("shutdown_deadline_ms", 10000) / 1000
need(pod.get("terminationGracePeriodSeconds", 30) > deadline_s, "the grace period is not above shutdown_deadline_ms")

seccomp = pod["securityContext"]["seccompProfile"]
need(seccomp["type"] == "Localhost", "no Localhost seccomp profile (RuntimeDefault blocks io_uring)")
profile = json.load(open(os.path.join(directory, "seccomp", os.path.basename(seccomp["localhostProfile"]))))
def allowed(call):
    for rule in profile.get("syscalls", []):
        if call in rule["names"]:
            return rule["action"] == "SCMP_ACT_ALLOW"
    return profile["defaultAction"] == "SCMP_ACT_ALLOW"
for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
    need(allowed(call), f"the seccomp profile refuses {call}")

mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
secret_dirs = {}
for name, volume in volumes.items():
    if "secret" in volume:
        secret = docs.get(("Secret", volume["secret"]["secretName"]))
        need(secret is not None, f"Secret {volume['secret']['secretName']} is not in the manifests")
        if secret:
            keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
            secret_dirs[mounts[name]] = (secret, keys)
files = re.findall(r'^\s*\w+_file\s*=\s*"([^"]+)"', config_text, re.M)
for path in files:
    where = [(d, s) for d, s in secret_dirs.items() if path.startswith(d.rstrip("/") + "/")]
    need(where, f"{path} is not in a mounted Secret")
    for mount, (_, keys) in where:
        need(path[len(mount.rstrip("/")) + 1:] in keys, f"{path}: the Secret has no such key")

if binary and not failures:
    with tempfile.TemporaryDirectory() as scratch:
        text = config_text
        for mount, (secret, keys) in secret_dirs.items():
            local = os.path.join(scratch, "secrets")
            os.makedirs(local, exist_ok=True)
            for key, value in secret.get("stringData", {}).items():
                open(os.path.join(local, key), "w").write(value)
            text = text.replace(mount.rstrip("/") + "/", local + "/")
        path = os.path.join(scratch, "shardgate.toml")
        open(path, "w").write(text)
        checked = subprocess.run([binary, "check", "--config", path], capture_output=True, text=True)
        need(checked.returncode == 0, f"shardgate check refuses the ConfigMap's config: {checked.stderr.strip()}")
        print(checked.stdout.strip().replace(path, "the ConfigMap's shardgate.toml"))

for failure in failures:
    print(f"k8s: {failure}", file=sys.stderr)
if failures:
    sys.exit(1)
print(f"k8s: {len(docs)} manifests agree with the gateway ({cpus} cores)")
PY
