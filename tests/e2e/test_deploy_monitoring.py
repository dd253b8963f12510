"""deploy/: the Grafana dashboard and the Prometheus alert rules, checked against what the proxy exports.

promtool (Debian's `prometheus` package; scripts/test installs it) checks the rules, runs their unit tests
(deploy/prometheus/alerts_test.yml) and parses every dashboard query. A real proxy, after traffic that makes
every metric family appear (two backends, one refusing connections; a webhook reporter whose consumer rejects;
rate limits; prices; a stream held open), is scraped: every metric name an expression of the dashboard or the
rules uses must be one of its samples, and every label an expression matches or groups by must be one of them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    CHAT,
    REPO,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    free_port,
    http_get,
    http_post,
    metric_value,
    post_request,
    raw_connect,
    send_request,
    start_mock,
    start_proxy,
    wait_for,
)

DASHBOARD = REPO / "deploy" / "grafana" / "llmproxy.json"
RULES_DIR = REPO / "deploy" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
ALERTS_TEST = RULES_DIR / "alerts_test.yml"
KEY = "sk-test-monitoring-0123456789abcdef"
LIMITED_KEY = "sk-test-monitoring-limited-0123456789"  # one request a minute: its second is refused
# Labels Prometheus adds to every scraped series; `le` is a histogram bucket's bound.
TARGET_LABELS = {"job", "instance"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian's prometheus package; scripts/test installs it)")
    return path


def run_promtool(*args: str, cwd: Path = RULES_DIR) -> str:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# PromQL: the metric names and label names of an expression ------------------------------------------------

STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
RANGE = re.compile(r"\[[^\]]*\]")
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
NUMBER = re.compile(r"(?<![\w:])(?:\d|\.\d)[\w.]*")  # 0.99, 1e3, 0x1f, and durations: 5m, 1h30m
IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
# Words that are PromQL's own where a metric name could stand: aggregations (an aggregation with a prefix
# `by (...)` is not followed by its parenthesis), set and comparison operators and modifiers, literals.
KEYWORDS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
            "quantile", "and", "or", "unless", "atan2", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def names_in(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, {metric name + "{" + label} matched in a selector, labels grouped or joined by) of a
    PromQL expression; function names, keywords, strings, numbers and durations are no metric names."""
    expr = STRING.sub('""', expr)
    matched = {f"{name or ''}{{{label}" for name, body in SELECTOR.findall(expr)
               for label in MATCHER_LABEL.findall(body)}
    expr = SELECTOR.sub(lambda m: (m.group(1) or "") + " ", expr)
    expr = RANGE.sub(" ", expr)
    grouped = {label.strip() for _, labels in LABEL_LIST.findall(expr) for label in labels.split(",")
               if label.strip()}
    expr = LABEL_LIST.sub(r" \1 ", expr)
    expr = NUMBER.sub(" ", expr)
    metrics = set()
    for match in IDENTIFIER.finditer(expr):
        word = match.group()
        if word.lower() in KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function call
        metrics.add(word)
    return metrics, matched, grouped


def unexported(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What `expr` uses that the scrape does not have: metric names, and labels absent from its metrics."""
    metrics, matched, grouped = names_in(expr)
    problems = [f"metric {name}" for name in sorted(metrics - exported.keys())]
    labels_of_expr = set().union(TARGET_LABELS, *(exported.get(name, set()) for name in metrics))
    for selector in sorted(matched):
        name, label = selector.split("{")
        known = exported.get(name, set()) | TARGET_LABELS if name else labels_of_expr
        if label not in known:
            problems.append(f"label {label} of {name or 'a selector'}")
    problems += [f"label {label} (grouping)" for label in sorted(grouped - labels_of_expr)]
    return problems


# The expressions of the dashboard and the rules -----------------------------------------------------------

GRAFANA_INTERVALS = re.compile(r"\$__(?:rate_interval|interval|range)\b")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.S)


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard by where it is (panel title / refId, or variable name)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"variable {variable['name']}: expected label_values(<selector>, <label>), got {query}"
            selector, label = match.groups()
            exprs[f"variable {variable['name']}"] = f"sum by ({label}) ({selector})"  # the same names, as PromQL
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus will get it: Grafana's interval variables made durations."""
    return GRAFANA_INTERVALS.sub("5m", expr)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# A real proxy after traffic that makes every family appear ------------------------------------------------

@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> str:
    """The /metrics text of a proxy that served, refused, retried, ejected, metered, priced and dead-lettered."""
    tmp = tmp_path_factory.mktemp("monitoring")
    started: list[Proc] = []
    try:
        mock = start_mock("vllm")
        started.append(mock)
        proxy = start_proxy(
            tmp,
            [{"name": "live", "url": mock.url, "type": "vllm", "models": ["m"]},
             # Connections refused: its first request is retried on "live", and the backend ejected.
             {"name": "refusing", "url": f"http://127.0.0.1:{free_port()}", "type": "vllm", "models": ["m"]}],
            # queue_depth polls the backends' /metrics (llmproxy_backend_queue_depth, _kv_cache_usage).
            routing={"load_balance": "queue_depth", "retries": 2},
            health_check={"enabled": False, "passive": {"consecutive_failures": 1}},
            auth={"enabled": True, "metrics_per_key": True, "keys": [
                {"key": KEY}, {"key": LIMITED_KEY, "rate_limit": {"requests_per_minute": 1, "burst": 1}}]},
            rate_limit={"enabled": True},
            pricing={"m": {"input_per_million": 1.0, "output_per_million": 2.0}},
            usage={"enabled": True, "spool_dir": str(tmp / "spool"), "reporters": [
                {"name": "file", "type": "file", "file": {"path": str(tmp / "usage.jsonl")}},
                # The mock answers 404 there: a rejection, dead-lettered at the first attempt.
                {"name": "hook", "type": "webhook", "webhook": {"url": mock.url + "/usage", "max_attempts": 1}}]})
        started.append(proxy)
        auth = {"authorization": f"Bearer {KEY}"}
        with raw_connect(proxy.port) as held:  # a stream held open by the mock's gate, seen in flight
            held.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                      {**auth, "x-mock-gate": "held", "x-mock-tokens": "2"}))
            reader = ResponseReader(held).read_head()
            wait_for(lambda: metric_value(proxy, "llmproxy_inflight_streams") == 1, timeout=10.0)
            for _ in range(8):  # one release per event: enough for the tokens, the usage event and [DONE]
                http_post(mock.url + "/_mock/release/held")
            assert reader.status == 200 and reader.read_body()[1]
        for _ in range(40):  # ties between the backends are broken at random: until "refusing" had its turn
            assert send_request(proxy.port, CHAT, auth)[0].status == 200
            if metric_value(proxy, "llmproxy_backend_ejections_total") >= 1:
                break
        limited = {"authorization": f"Bearer {LIMITED_KEY}"}
        assert [send_request(proxy.port, CHAT, limited)[0].status for _ in range(2)] == [200, 429]
        assert send_request(proxy.port, CHAT, {"authorization": "Bearer sk-unknown-0123456789abcdef"})[0].status == 401
        wait_for(lambda: metric_value(proxy, "llmproxy_usage_dead_letters_total") >= 1
                 and metric_value(proxy, "llmproxy_webhook_success_total") >= 1, timeout=10.0)
        wait_for(lambda: metric_value(proxy, "llmproxy_inflight_streams") == 0, timeout=10.0)
        return http_get(proxy.url + "/metrics")[1].decode()
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture(scope="module")
def exported(scrape: str) -> dict[str, set[str]]:
    """Every sample name of the scrape (a counter's _total, a histogram's _bucket/_sum/_count) -> its labels."""
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


# The tests -------------------------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", ALERTS.name)


def test_alert_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", ALERTS_TEST.name)


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for rule in alert_rules():
        fired = [c for c in checks if c["alertname"] == rule["alert"] and c["exp_alerts"]]
        quiet = [c for c in checks if c["alertname"] == rule["alert"] and not c["exp_alerts"]]
        assert fired and quiet, f"{rule['alert']}: tested firing {len(fired)} times and quiet {len(quiet)} times"


def test_every_alert_has_a_severity_a_summary_and_a_runbook() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_every_dashboard_query_is_valid_promql(tmp_path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
             for i, expr in enumerate(dashboard_exprs().values())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", str(path), cwd=tmp_path)


def test_the_dashboard_is_a_grafana_model_over_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "llmproxy" and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "backend", "model", "key"} <= variables.keys()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert panels[0]["type"] == "row"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
            assert panel["targets"] and panel.get("description"), panel["title"]


def test_every_metric_and_label_the_dashboard_and_alerts_use_is_exported(exported) -> None:
    exprs = {**dashboard_exprs(), **{f"alert {r['alert']}": r["expr"] for r in alert_rules()}}
    problems = {where: missing for where, expr in exprs.items() if (missing := unexported(expr, exported))}
    assert not problems, problems
    used = set().union(*(names_in(expr)[0] for expr in exprs.values()))
    # The panels the issue names, each on its own metric (not merely on something exported).
    assert {"llmproxy_inflight_streams", "llmproxy_usage_outbox_pending", "llmproxy_backend_queue_depth",
            "llmproxy_usage_dead_letters_total", "llmproxy_ratelimited_total", "llmproxy_backend_ejections_total",
            "llmproxy_terminations_total", "llmproxy_proxy_chunk_overhead_seconds_bucket",
            "llmproxy_estimated_cost_usd_total", "llmproxy_ratelimit_store_errors_total"} <= used


def test_tokens_and_cost_are_labelled_by_key_with_metrics_per_key(exported, scrape) -> None:
    assert {"model", "key_id", "type"} <= exported["llmproxy_usage_tokens_total"]
    assert {"model", "key_id"} <= exported["llmproxy_estimated_cost_usd_total"]
    key_ids = {s.labels["key_id"] for f in text_string_to_metric_families(scrape) for s in f.samples
               if s.name == "llmproxy_usage_tokens_total"}
    assert key_ids and "" not in key_ids  # every record came with the key, and names it


CHECKER_CASES = {
    # expression: (metric names, matched "name{label", grouping labels)
    'sum by (backend) (rate(llmproxy_requests_total{status=~"5..", job=~"$job"}[5m]))':
        ({"llmproxy_requests_total"}, {"llmproxy_requests_total{status", "llmproxy_requests_total{job"}, {"backend"}),
    "histogram_quantile(0.99, sum(rate(a_bucket[$__rate_interval])) by (le)) > 1e-3":
        ({"a_bucket"}, set(), {"le"}),
    'a / on (instance) group_left (model) b offset 1h30m unless c == bool 2':
        ({"a", "b", "c"}, set(), {"instance", "model"}),
    'label_replace(x, "dst", "$1", "src", "(.*)") and topk(5, y{l="a}b"})':
        ({"x", "y"}, {"y{l"}, set()),
    "count without (le) (z) * 0.5 + Inf - NaN":
        ({"z"}, set(), {"le"}),
}


@pytest.mark.parametrize("expr", CHECKER_CASES)
def test_names_in_finds_metrics_and_labels_and_nothing_else(expr) -> None:
    assert names_in(expr) == CHECKER_CASES[expr]


def test_the_check_rejects_a_misspelled_metric_or_label() -> None:
    exported = {"llmproxy_requests_total": {"backend", "status"}}
    assert unexported("sum by (backend) (rate(llmproxy_requests_total[5m]))", exported) == []
    assert unexported("rate(llmproxy_request_total[5m])", exported) == ["metric llmproxy_request_total"]
    assert unexported('rate(llmproxy_requests_total{stauts="500"}[5m])', exported) == [
        "label stauts of llmproxy_requests_total"]
    assert unexported("sum by (backnd) (rate(llmproxy_requests_total[5m]))", exported) == [
        "label backnd (grouping)"]
