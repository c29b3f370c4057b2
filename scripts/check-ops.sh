#!/usr/bin/env bash
# Validate the operations surface: Kubernetes manifests, Dockerfile, compose stack, alert rules,
# Grafana dashboard, and the live /metrics of a relay. Offline apart from the tool installs.
#
#   scripts/check-ops.sh                 run every check, print a PASS/FAIL summary, exit 1 on any FAIL
#   scripts/check-ops.sh --sync-rules    regenerate k8s/components/monitoring/prometheusrule.yaml
#                                        from deploy/prometheus/alerts.yml, then exit
#
# Environment: K8S_VERSIONS (default "1.30.0 1.37.0": the oldest supported and the newest schemas
# kubernetes-validate ships), SKIP_ENSURE=1 (do not run scripts/ensure-ops-tools.sh).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
VENV="${OPS_VENV:-$ROOT/.tools/ops-venv}"
TOOLS="$VENV/bin"
PYTOOLS="$TOOLS/python"            # has PyYAML (a checkov / yamllint dependency)
RELAY="${RELAY_BIN:-$ROOT/.venv/bin/relay}"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
ALERTS=deploy/prometheus/alerts.yml
PROMRULE=k8s/components/monitoring/prometheusrule.yaml
YAMLLINT_CONFIG=deploy/yamllint.yaml
CHECKOV_CONFIG=deploy/checkov.yaml

# --- --sync-rules ----------------------------------------------------------------------------
# The PrometheusRule embeds alerts.yml's `groups:` block verbatim (comments and all) under `spec:`.
sync_rules() {
  {
    printf '%s\n' \
      "# GENERATED from $ALERTS by scripts/check-ops.sh --sync-rules. Do not edit by hand." \
      "apiVersion: monitoring.coreos.com/v1" \
      "kind: PrometheusRule" \
      "metadata:" \
      "  name: revoke-relay" \
      "spec:"
    sed -n '/^groups:/,$p' "$ALERTS" | sed 's/^\(.\)/  \1/'
  } > "$1"
}
if [ "${1:-}" = "--sync-rules" ]; then
  sync_rules "$PROMRULE"
  echo "wrote $PROMRULE from $ALERTS"
  exit 0
fi

# --- runner ----------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-ops.XXXXXX")"
RELAY_PID=""
cleanup() {
  if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
    kill -TERM "$RELAY_PID" 2>/dev/null
    wait "$RELAY_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

declare -a SUMMARY=()
FAILED=0
T0=$(date +%s)

# run NAME FUNCTION: run a check, show its output indented, record PASS/FAIL with its duration.
run() {
  local name="$1" fn="$2" start rc log
  start=$(date +%s%N)
  log="$WORK/$name.log"
  echo "==> $name"
  "$fn" > "$log" 2>&1
  rc=$?
  sed 's/^/    /' "$log"
  local tenths secs
  tenths=$(( ($(date +%s%N) - start) / 100000000 ))
  secs="$((tenths / 10)).$((tenths % 10))"
  local detail
  detail="$(grep -m1 '^RESULT: ' "$log" | sed 's/^RESULT: //')"
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("PASS  $(printf '%-24s' "$name") ${secs}s  $detail")
  else
    SUMMARY+=("FAIL  $(printf '%-24s' "$name") ${secs}s  $detail (exit $rc)")
    FAILED=1
  fi
}

# kubectl must never talk to a cluster (with no kubeconfig it would try localhost:8080, where a relay
# under test may listen): run it in an empty network namespace, or with a kubeconfig pointing nowhere.
kubectl_offline() {
  if unshare -n true 2>/dev/null; then
    unshare -n kubectl "$@"
  else
    printf 'apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n' > "$WORK/kubeconfig"
    KUBECONFIG="$WORK/kubeconfig" kubectl --server=https://127.0.0.1:9 "$@"
  fi
}

# --- checks ----------------------------------------------------------------------------------

check_tools() {
  if [ "${SKIP_ENSURE:-0}" != 1 ]; then
    "$ROOT/scripts/ensure-ops-tools.sh" || return 1
  fi
  if [ ! -x "$RELAY" ] && [ -z "${RELAY_BIN:-}" ]; then
    echo "creating the project venv (.venv) for the live relay, as 'make test' does"
    make -C "$ROOT" --no-print-directory .venv/.installed || return 1
  fi
  local missing=0 t
  for t in "$TOOLS/kubernetes-validate" "$TOOLS/checkov" "$TOOLS/yamllint" "$TOOLS/hadolint" \
           "$TOOLS/shellcheck" "$(command -v promtool)" "$(command -v kubectl)" "$RELAY"; do
    if [ ! -x "$t" ]; then echo "missing: ${t:-a tool}"; missing=1; fi
  done
  echo "RESULT: tools ready"
  return "$missing"
}

# Render every overlay; split each rendering into core resources and custom resources (CRDs).
check_render() {
  local o name n
  mkdir -p "$WORK/rendered"
  n=0
  for o in k8s/overlays/*/; do
    name="$(basename "$o")"
    kubectl_offline kustomize "$o" > "$WORK/rendered/$name.yaml" || { echo "render $o failed"; return 1; }
    n=$((n + 1))
  done
  "$PYTOOLS" - "$WORK/rendered" <<'PY' || return 1
import pathlib, sys, yaml
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*.yaml")):
    if path.name.endswith((".core.yaml", ".crd.yaml")):
        continue
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    core = [d for d in docs if "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].split("/")[0].endswith(".k8s.io")]
    crds = [d for d in docs if d not in core]
    path.with_suffix(".core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    path.with_suffix(".crd.yaml").write_text(yaml.safe_dump_all(crds, sort_keys=False))
    kinds = ", ".join(sorted({d["kind"] for d in crds}))
    print(f"{path.stem}: {len(docs)} resources ({len(core)} core, {len(crds)} custom: {kinds})")
PY
  echo "RESULT: $n overlays rendered"
}

check_kubernetes_validate() {
  local f v total=0 rc=0
  for v in $K8S_VERSIONS; do
    for f in "$WORK"/rendered/*.core.yaml k8s/ops/*.yaml; do
      local count
      count=$(grep -c '^kind:' "$f")
      [ "$count" -gt 0 ] || { echo "$f: no resources"; rc=1; continue; }
      if "$TOOLS/kubernetes-validate" --strict -k "$v" --quiet "$f"; then
        echo "k8s $v strict: $(basename "$f"): $count resources valid"
        total=$((total + count))
      else
        echo "k8s $v strict: $(basename "$f"): INVALID"
        rc=1
      fi
    done
  done
  echo "RESULT: $total resource validations passed (strict, Kubernetes $K8S_VERSIONS)"
  return "$rc"
}

# Custom resources have no schema in kubernetes-validate: check each one explicitly against what it
# must agree with (Service labels and ports, alerts.yml, the relay's exchange/queue settings), and
# check cross-resource invariants of the core resources (shutdown budget, spool on the PVC).
check_custom_resources() {
  "$PYTOOLS" - "$WORK/rendered" "$ALERTS" <<'PY'
import pathlib, re, sys, yaml

rendered, alerts_path = pathlib.Path(sys.argv[1]), sys.argv[2]
alerts = yaml.safe_load(open(alerts_path))
problems, checked = [], 0
# The relay's own bound on recalls in flight at shutdown (read from the code, so both stay in step).
API_SHUTDOWN_TIMEOUT = float(re.search(r"^API_SHUTDOWN_TIMEOUT = ([0-9.]+)", pathlib.Path("relay/app.py").read_text(), re.M).group(1))

def need(cond, msg):
    if not cond:
        problems.append(msg)

for core_path in sorted(rendered.glob("*.core.yaml")):
    overlay = core_path.name.split(".")[0]
    core = [d for d in yaml.safe_load_all(core_path.read_text()) if d]
    crds = [d for d in yaml.safe_load_all(core_path.with_name(f"{overlay}.crd.yaml").read_text()) if d]
    by_kind = {}
    for d in core:
        by_kind.setdefault(d["kind"], []).append(d)
    cm = by_kind["ConfigMap"][0]["data"]
    sts = by_kind["StatefulSet"][0]
    pod = sts["spec"]["template"]["spec"]
    ctr = pod["containers"][0]

    # Shutdown budget: grace >= preStop + shutdown delay + recalls in flight on the API port
    # (relay.app.API_SHUTDOWN_TIMEOUT) + in-flight callbacks (publish timeout + 2) + drain + 2.
    pre = ctr["lifecycle"]["preStop"]
    pre_s = float(pre["exec"]["command"][-1]) if "exec" in pre else float(pre["sleep"]["seconds"])
    need_s = pre_s + float(cm["RELAY_SHUTDOWN_DELAY"]) + API_SHUTDOWN_TIMEOUT + float(cm["RELAY_PUBLISH_TIMEOUT"]) + 2 \
        + float(cm["RELAY_DRAIN_TIMEOUT"]) + 2
    grace = pod["terminationGracePeriodSeconds"]
    need(grace >= need_s, f"{overlay}: terminationGracePeriodSeconds {grace} < shutdown budget {need_s:g}")
    print(f"{overlay}: shutdown budget {need_s:g}s <= terminationGracePeriodSeconds {grace}s")

    # The spool lives on the PVC, not on the read-only root or an emptyDir.
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    spool = cm["RELAY_SPOOL_DIR"]
    mounts = [m for m in ctr["volumeMounts"] if spool == m["mountPath"] or spool.startswith(m["mountPath"].rstrip("/") + "/")]
    need(mounts and mounts[-1]["name"] in claims, f"{overlay}: RELAY_SPOOL_DIR {spool} is not on a volumeClaimTemplate")

    # Secrets referenced by the pod: rendered (dev example) or documented as created out of band (prod).
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in ctr.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    rendered_secrets = {d["metadata"]["name"] for d in by_kind.get("Secret", [])}
    print(f"{overlay}: secrets referenced {sorted(secrets)}, rendered {sorted(rendered_secrets) or 'none (created out of band)'}")

    services = by_kind["Service"]
    for d in crds:
        kind, name = d["kind"], d["metadata"]["name"]
        checked += 1
        need(d["metadata"].get("namespace") == sts["metadata"].get("namespace"),
             f"{overlay}: {kind}/{name} is not in the relay's namespace")
        spec = d.get("spec") or {}
        if kind == "ServiceMonitor":
            sel = spec["selector"]["matchLabels"]
            hits = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
            need(len(hits) == 1, f"{overlay}: ServiceMonitor selects {len(hits)} Services, want exactly 1")
            for ep in spec["endpoints"]:
                need(any(p.get("name") == ep["port"] for s in hits for p in s["spec"]["ports"]),
                     f"{overlay}: ServiceMonitor port {ep['port']!r} is not a port of the selected Service")
                need(ep.get("path") == "/metrics", f"{overlay}: ServiceMonitor path must be /metrics")
        elif kind == "PrometheusRule":
            need(spec.get("groups") == alerts["groups"],
                 f"{overlay}: PrometheusRule spec.groups differs from {alerts_path} (run scripts/check-ops.sh --sync-rules)")
        elif kind == "Exchange":
            need(spec.get("name") == cm["RELAY_EXCHANGE"] and spec.get("type") == "topic" and spec.get("durable") is True,
                 f"{overlay}: Exchange {spec.get('name')} must be the durable topic exchange RELAY_EXCHANGE")
        elif kind == "Queue":
            need(spec.get("name") in cm["RELAY_QUEUES"].split(",") and spec.get("type") == "quorum"
                 and spec.get("durable") is True, f"{overlay}: Queue {spec.get('name')} not a durable quorum queue of RELAY_QUEUES")
        elif kind == "Binding":
            need(spec.get("source") == cm["RELAY_EXCHANGE"] and spec.get("destinationType") == "queue"
                 and spec.get("destination") in cm["RELAY_QUEUES"].split(",") and spec.get("routingKey") == "message.revoked.#",
                 f"{overlay}: Binding {name} does not bind RELAY_EXCHANGE to a RELAY_QUEUES queue with message.revoked.#")
        else:
            problems.append(f"{overlay}: unexpected custom resource {kind}/{name}: add a check for it")
        if d["apiVersion"].startswith("rabbitmq.com/"):
            need(spec.get("rabbitmqClusterReference", {}).get("name"), f"{overlay}: {kind}/{name} lacks rabbitmqClusterReference")
    # Every queue the relay declares is also declared by the topology component, when it is used.
    queues = {d["spec"]["name"] for d in crds if d["kind"] == "Queue"}
    if queues:
        need(queues == set(cm["RELAY_QUEUES"].split(",")), f"{overlay}: topology queues {sorted(queues)} != RELAY_QUEUES")
        bound = {d["spec"]["destination"] for d in crds if d["kind"] == "Binding"}
        need(bound == queues, f"{overlay}: queues without a binding: {sorted(queues - bound)}")
    print(f"{overlay}: custom resources checked: {', '.join(sorted(d['kind'] + '/' + d['metadata']['name'] for d in crds))}")

for p in problems:
    print("PROBLEM:", p)
print(f"RESULT: {checked} custom resources, {len(problems)} problems")
sys.exit(1 if problems else 0)
PY
}

check_prometheusrule_sync() {
  sync_rules "$WORK/prometheusrule.yaml"
  if diff -u "$PROMRULE" "$WORK/prometheusrule.yaml"; then
    echo "RESULT: $PROMRULE is generated from $ALERTS and up to date"
  else
    echo "RESULT: $PROMRULE is stale: run scripts/check-ops.sh --sync-rules"
    return 1
  fi
}

check_checkov() {
  local args=() f
  for f in "$WORK"/rendered/*.core.yaml k8s/ops/*.yaml; do args+=(-f "$f"); done
  args+=(-f deploy/Dockerfile)
  "$TOOLS/checkov" --config-file "$CHECKOV_CONFIG" "${args[@]}" \
    -o json --output-file-path "$WORK/checkov" > "$WORK/checkov.out" 2>&1
  local rc=$?
  [ -f "$WORK/checkov/results_json.json" ] || { cat "$WORK/checkov.out"; return 1; }
  "$PYTOOLS" - "$WORK/checkov/results_json.json" <<'PY' || rc=1
import json, sys
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
passed = failed = skipped = 0
for r in reports:
    s = r.get("summary", {})
    passed += s.get("passed", 0); failed += s.get("failed", 0); skipped += s.get("skipped", 0)
    print(f"{r['check_type']}: {s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('skipped', 0)} waived, "
          f"{s.get('resource_count', 0)} resources")
    for c in r.get("results", {}).get("failed_checks", []):
        print(f"FAILED {c['check_id']} {c['check_name']} [{c.get('resource')}] {c.get('file_path')}")
    for c in r.get("results", {}).get("skipped_checks", []):
        reason = (c.get("check_result") or {}).get("suppress_comment") or "NO REASON"
        print(f"waived {c['check_id']} [{c.get('resource')}]: {reason}")
        if reason.strip() in ("", "NO REASON", "No comment provided"):
            print(f"  ^ waiver without a written reason"); failed += 1
print(f"RESULT: {passed} passed, {failed} failed, {skipped} waived (with reasons)")
sys.exit(1 if failed else 0)
PY
  return "$rc"
}

check_hadolint() {
  "$TOOLS/hadolint" --no-color --failure-threshold info deploy/Dockerfile || return 1
  echo "RESULT: deploy/Dockerfile: no findings"
}

check_yamllint() {
  "$TOOLS/yamllint" --strict -c "$YAMLLINT_CONFIG" k8s/ deploy/ || return 1
  echo "RESULT: $(find k8s deploy -name '*.y*ml' | wc -l) YAML files clean"
}

check_shellcheck() {
  "$TOOLS/shellcheck" scripts/*.sh .ci/run || return 1
  echo "RESULT: scripts/*.sh and .ci/run clean"
}

check_promtool_rules() {
  promtool check rules "$ALERTS" || return 1
  promtool check config deploy/prometheus/prometheus.yml || return 1
  promtool test rules deploy/prometheus/alerts_test.yml || return 1
  # Every alert has a firing and a silent case in the tests.
  "$PYTOOLS" - "$ALERTS" deploy/prometheus/alerts_test.yml docs/deploy.md <<'PY' || return 1
import re, sys, yaml
alerts = yaml.safe_load(open(sys.argv[1]))["groups"]
tests = yaml.safe_load(open(sys.argv[2]))["tests"]
doc = open(sys.argv[3]).read()
anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", doc, re.M)}
fires, silent, problems = set(), set(), []
for t in tests:
    for case in t.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else silent).add(case["alertname"])
names = [r["alert"] for g in alerts for r in g["rules"] if "alert" in r]
for r in (r for g in alerts for r in g["rules"] if "alert" in r):
    n = r["alert"]
    if n not in fires: problems.append(f"{n}: no firing test case")
    if n not in silent: problems.append(f"{n}: no not-firing test case")
    if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"): problems.append(f"{n}: severity label")
    ann = r.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        if not ann.get(key): problems.append(f"{n}: missing annotation {key}")
    anchor = ann.get("runbook_url", "").partition("docs/deploy.md#")[2]
    if anchor not in anchors: problems.append(f"{n}: runbook anchor #{anchor} not a heading in docs/deploy.md")
for p in problems: print("PROBLEM:", p)
print(f"RESULT: {len(names)} alerts, each with firing + silent tests, severity, annotations and a runbook anchor" if not problems else f"RESULT: {len(problems)} problems")
sys.exit(1 if problems else 0)
PY
}

# Grafana dashboard: valid JSON, every panel has a query, and every query parses as PromQL
# (each one becomes a recording rule that `promtool check rules` parses).
check_dashboard() {
  "$PYTOOLS" - deploy/grafana/dashboards/revoke-relay.json "$WORK/dashboard-rules.yml" <<'PY' || return 1
import json, sys, yaml
dash = json.load(open(sys.argv[1]))
exprs, problems = [], []
for p in dash["panels"]:
    if p.get("type") == "row":
        continue
    targets = [t for t in p.get("targets", []) if t.get("expr")]
    if not targets:
        problems.append(f"panel {p.get('title')!r} has no query")
    for t in targets:
        exprs.append(t["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h").replace("$instance", ".+"))
rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
yaml.safe_dump(rules, open(sys.argv[2], "w"))
for pr in problems: print("PROBLEM:", pr)
print(f"{len(dash['panels'])} panels, {len(exprs)} queries")
sys.exit(1 if problems else 0)
PY
  promtool check rules "$WORK/dashboard-rules.yml" || return 1
  echo "RESULT: $(grep -c 'record:' "$WORK/dashboard-rules.yml") dashboard queries parse as PromQL"
}

# docker-compose: no Docker engine here, so check what can be checked statically.
check_compose() {
  "$PYTOOLS" - deploy/docker-compose.yml <<'PY'
import os, sys, yaml
path = sys.argv[1]; base = os.path.dirname(path)
c = yaml.safe_load(open(path))
problems = []
want = {"rabbitmq", "relay", "prometheus", "grafana"}
missing = want - set(c["services"])
if missing: problems.append(f"services missing: {sorted(missing)}")
for name, s in c["services"].items():
    b = s.get("build")
    if b:
        ctx = os.path.normpath(os.path.join(base, b["context"]))
        if not os.path.isfile(os.path.join(ctx, b["dockerfile"])): problems.append(f"{name}: dockerfile not found")
    elif ":" not in s.get("image", "") or s["image"].endswith(":latest"):
        problems.append(f"{name}: image must carry a fixed tag")
    for v in s.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith((".", "/")) and not os.path.exists(os.path.join(base, src)):
            problems.append(f"{name}: bind mount source {src} does not exist")
    for dep in s.get("depends_on", {}):
        if dep not in c["services"]: problems.append(f"{name}: depends on unknown service {dep}")
for p in problems: print("PROBLEM:", p)
print(f"RESULT: {len(c['services'])} services, {len(problems)} problems")
sys.exit(1 if problems else 0)
PY
}

# A live relay (spool only: nothing listens on the AMQP port), one callback, one scrape.
check_live_metrics() {
  local port spool i
  port=$("$PYTOOLS" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  spool="$WORK/spool"
  RELAY_SDKAPPIDS=1400000001 RELAY_HOST=127.0.0.1 RELAY_PORT="$port" RELAY_SPOOL_DIR="$spool" \
    RELAY_AMQP_URL=amqp://guest:guest@127.0.0.1:1/ RELAY_SHUTDOWN_DELAY=0 RELAY_DRAIN_TIMEOUT=1 \
    "$RELAY" serve > "$WORK/relay.log" 2>&1 &
  RELAY_PID=$!
  for i in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/healthz" > /dev/null 2>&1 && break
    kill -0 "$RELAY_PID" 2>/dev/null || { echo "relay exited:"; cat "$WORK/relay.log"; return 1; }
    sleep 0.1
  done
  [ "$i" -lt 100 ] || { echo "relay did not answer /healthz"; return 1; }
  "$RELAY" send-sample --url "http://127.0.0.1:$port/tencent-im/callback" --sdkappid 1400000001 || return 1
  curl -fsS "http://127.0.0.1:$port/metrics" > "$WORK/metrics.txt" || return 1
  kill -TERM "$RELAY_PID"
  wait "$RELAY_PID"
  local rc=$?
  RELAY_PID=""
  [ "$rc" -eq 0 ] || { echo "relay exited $rc after SIGTERM"; tail -5 "$WORK/relay.log"; return 1; }
  promtool check metrics < "$WORK/metrics.txt" || { echo "promtool check metrics found problems"; return 1; }
  grep -q '^relay_callbacks_total{command="C2C.CallbackAfterMsgWithDraw",outcome="accepted"} 1.0$' "$WORK/metrics.txt" \
    || { echo "the sample callback was not counted as accepted"; grep '^relay_callbacks_total' "$WORK/metrics.txt"; return 1; }
  # Every relay_ metric scraped is documented in docs/metrics.md, and every metric the alerts and
  # the dashboard use exists.
  "$PYTOOLS" - "$WORK/metrics.txt" docs/metrics.md "$ALERTS" deploy/grafana/dashboards/revoke-relay.json <<'PY' || return 1
import re, sys
scrape = open(sys.argv[1]).read()
# One `# TYPE` line per family; prometheus_client adds a `<name>_created` gauge beside counters and
# histograms (creation timestamps), which is not a metric of its own.
names = {n for n in re.findall(r"^# TYPE (relay_\w+) \w+", scrape, re.M) if not n.endswith("_created")}
doc = open(sys.argv[2]).read()
documented = set(re.findall(r"^\| `(relay_\w+)`", doc, re.M))
problems = [f"scraped but not in docs/metrics.md: {n}" for n in sorted(names - documented)]
problems += [f"in docs/metrics.md but not scraped: {n}" for n in sorted(documented - names)]
rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(relay_\w+)` \|[^|]*\|([^|]*)\|", doc, re.M)}
quoted = set(re.findall(r"`([^`]+)`", doc))
for line in scrape.splitlines():
    m = re.match(r"(relay_\w+?)(?:_bucket|_sum|_count)?\{(.*)\} ", line)
    if not m or line.startswith("#"):
        continue
    family = next((n for n in (m.group(1), line.split("{")[0]) if n in names), None)
    if family is None:
        continue
    for label, value in re.findall(r'(\w+)="([^"]*)"', m.group(2)):
        if label == "le":
            continue
        if f"`{label}`" not in rows.get(family, ""):
            problems.append(f"{family}: label {label} not in its docs/metrics.md row")
        if value not in quoted:
            problems.append(f"{family}: label value {label}={value!r} not documented in docs/metrics.md")
used = set()
for f in sys.argv[3:]:
    used |= set(re.findall(r"\b(relay_\w+)", open(f).read()))
known = names | {n + s for n in names for s in ("_bucket", "_sum", "_count")}
problems += [f"used by alerts/dashboard but not exposed: {n}" for n in sorted(used - known)]
problems = list(dict.fromkeys(problems))
for p in problems: print("PROBLEM:", p)
if problems:
    print(f"RESULT: {len(problems)} problems between /metrics, docs/metrics.md and alerts/dashboard")
else:
    print(f"RESULT: promtool check metrics clean; {len(names)} relay metrics, all documented; {len(used)} used by alerts/dashboard exist")
sys.exit(1 if problems else 0)
PY
}

# --- main ------------------------------------------------------------------------------------
run tools check_tools
if [ "$FAILED" -ne 0 ]; then
  echo "tools are missing; run scripts/ensure-ops-tools.sh as root" >&2
  exit 1
fi
run render check_render
run kubernetes-validate check_kubernetes_validate
run custom-resources check_custom_resources
run prometheusrule-sync check_prometheusrule_sync
run checkov check_checkov
run hadolint check_hadolint
run yamllint check_yamllint
run shellcheck check_shellcheck
run promtool-rules check_promtool_rules
run dashboard check_dashboard
run compose check_compose
run live-metrics check_live_metrics

echo
echo "check-ops summary ($(($(date +%s) - T0))s):"
printf '  %s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "check-ops: FAIL"
  exit 1
fi
echo "check-ops: PASS"
