"""The dashboard and the alerts query what the code exports.

`deploy/grafana/rlhf.json` (the Grafana dashboard) and the PrometheusRule of the monitoring
component (`deploy/k8s/components/monitoring/prometheusrule-rlhf.yaml`) are PromQL written by
hand against metric names. A renamed metric, a misspelt name or label, or a `rate()` of a gauge
would leave a panel empty or an alert that never fires, silently. So: import every module that
defines metrics, read the names from prometheus_client's registry, apply the exposition rules
(a counter `x` is scraped as `x_total`, a histogram as `x_bucket`, `x_count`, `x_sum`), and
check every metric name every panel, variable and alert queries against them, and the label
names their selectors use. Every rlhf metric has a panel; every alert has a severity label and
summary and description annotations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "rlhf.json"
RULES = REPO / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule-rlhf.yaml"
# Every module that defines Prometheus metrics (grep `Counter(`, `Gauge(`, `Histogram(`).
METRIC_MODULES = ("rlhf.serving.metrics", "rlhf.labels.app")

# How a metric family of each type appears in a scrape (OpenMetrics / prometheus_client).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}
COUNTING = {"counter", "histogram", "summary"}  # what rate() / increase() may take

PROMQL_FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase irate label_join label_replace last_over_time
    ln log10 log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
    present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
    sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year
    avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum topk
""".split())
PROMQL_KEYWORDS = frozenset("and or unless by without on ignoring group_left group_right offset "
                            "bool atan2 inf nan".split())
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][\w:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_COUNTING_CALL = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([a-zA-Z_:][\w:]*)")


# ---------------------------------------------------------------------------------------------
# what the code exports
# ---------------------------------------------------------------------------------------------


def _exported() -> tuple[dict[str, str], dict[str, set[str]]]:
    """({scraped series name: family type}, {scraped series name: its label names})."""
    import importlib

    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    collectors = REGISTRY._names_to_collectors  # noqa: SLF001 - the label names of each metric
    for family in REGISTRY.collect():
        collector = collectors.get(family.name) or collectors.get(family.name + "_total")
        own = set(getattr(collector, "_labelnames", ()))
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.type
            labels[family.name + suffix] = own | ({"le"} if suffix == "_bucket" else set())
    return names, labels


EXPORTED, LABELS = _exported()


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(0), text[m.end():].lstrip()
        if word in PROMQL_KEYWORDS:
            continue
        if rest.startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
            continue
        names.add(word)
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names its matchers use) for every `metric{...}` selector."""
    text = _STRING.sub('""', expr)
    return [(m.group(1), set(_MATCHER_LABEL.findall(m.group(2)))) for m in _SELECTOR.finditer(text)]


def check_query(expr: str, where: str) -> set[str]:
    """Every name `expr` queries is exported, with the labels its matchers name; rate() and
    increase() take counting series only. Returns the names."""
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = sorted(n for n in names if n not in EXPORTED)
    assert not unknown, f"{where}: {unknown} not exported by the code (query {expr!r})"
    for metric, used in selector_labels(expr):
        missing = used - LABELS[metric]
        assert not missing, f"{where}: {metric} has no label(s) {sorted(missing)}"
    for metric in _COUNTING_CALL.findall(_STRING.sub('""', expr)):
        kind = EXPORTED[metric]
        assert kind in COUNTING, f"{where}: rate/increase of the {kind} {metric}"
    return names


def test_the_registry_holds_the_platform_s_metrics():
    assert {"rlhf_rpc_total", "rlhf_rpc_latency_seconds_bucket", "rlhf_queue_depth",
            "rlhf_active_model", "rlhf_train_metric", "rlhf_labels_votes_total"} <= set(EXPORTED)
    assert "rlhf_rpc" not in EXPORTED and "rlhf_rpc_latency_seconds" not in EXPORTED
    assert {"service", "method", "code"} == LABELS["rlhf_rpc_total"]


def test_the_promql_reader_finds_names_and_catches_mistakes():
    expr = ('histogram_quantile(0.99, sum by (le, service) (rate(rlhf_rpc_latency_seconds_bucket'
            '{service=~"$service",code!="OK"}[$__rate_interval]))) > 1e3 and on (service) '
            'max(rlhf_redis_maxmemory_bytes > 0) / ignoring(x) absent(rlhf_active_model)')
    assert promql_metric_names(expr) == {"rlhf_rpc_latency_seconds_bucket",
                                         "rlhf_redis_maxmemory_bytes", "rlhf_active_model"}
    assert promql_metric_names('sum(rate(rlhf_rpc_total{method="sum(x)"}[5m])) by (code)') == {
        "rlhf_rpc_total"}
    check_query(expr, "self-test")
    for bad in ("rate(rlhf_rpc_totl[5m])",  # misspelt
                "rate(rlhf_rpc[5m])",  # the family name, not a scraped series
                "rlhf_rpc_latency_seconds",  # a histogram is scraped as _bucket/_count/_sum
                'rlhf_rpc_total{servce="policy"}',  # no such label
                "rate(rlhf_queue_depth[5m])",  # a gauge
                "sum(rat(rlhf_rpc_total[5m]))"):  # no such function
        with pytest.raises(AssertionError):
            check_query(bad, "self-test")


# ---------------------------------------------------------------------------------------------
# the Grafana dashboard
# ---------------------------------------------------------------------------------------------


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


DASH = json.loads(DASHBOARD.read_text())
PANELS = [p for p in _panels(DASH["panels"]) if p["type"] != "row"]
VARIABLES = {v["name"]: v for v in DASH["templating"]["list"]}


def _variable_query(var: dict) -> str:
    query = var["query"]
    return query["query"] if isinstance(query, dict) else query


def test_dashboard_is_importable_grafana_json():
    assert DASH["uid"] and DASH["title"] and isinstance(DASH["schemaVersion"], int)
    ids = [p["id"] for p in _panels(DASH["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert VARIABLES["datasource"]["type"] == "datasource"
    assert VARIABLES["datasource"]["query"] == "prometheus"
    for panel in PANELS:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    titles = [p["title"] for p in PANELS]
    assert len(titles) == len(set(titles)), "panel titles are unique"


def test_every_dashboard_query_asks_for_exported_metrics():
    used = set()
    for panel in PANELS:
        for target in panel["targets"]:
            expr = target["expr"]
            used |= check_query(expr, f"panel {panel['title']!r} {target['refId']}")
            for var in re.findall(r"\$\{?(\w+)\}?", expr):
                assert var.startswith("__") or var in VARIABLES, f"{panel['title']}: ${var}"
    for name, var in VARIABLES.items():
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", _variable_query(var))
        assert m, f"variable {name}: label_values(metric, label)"
        assert m.group(1) in EXPORTED and m.group(2) in LABELS[m.group(1)], f"variable {name}"
        used.add(m.group(1))
    # every metric of the platform is on the dashboard (a new metric gets a panel)
    families = {n.removesuffix(s) for n, t in EXPORTED.items() for s in SUFFIXES[t]
                if s and n.endswith(s)} | {n for n, t in EXPORTED.items() if "" in SUFFIXES[t]}
    shown = {n.removesuffix(s) for n in used for s in ("_total", "_bucket", "_count", "_sum")
             if n.endswith(s)} | used
    missing = sorted(f for f in families if f.startswith("rlhf_") and f not in shown)
    assert not missing, f"metrics without a panel: {missing}"


# ---------------------------------------------------------------------------------------------
# the alerts
# ---------------------------------------------------------------------------------------------


RULE = yaml.safe_load(RULES.read_text())
ALERTS = [r for g in RULE["spec"]["groups"] for r in g["rules"] if "alert" in r]


def test_the_documented_alerts_exist():
    """docs/operations.md: alert on the error ratio, dead letters, a failed swap, a queue that
    only grows, Redis memory near maxmemory."""
    names = {a["alert"] for a in ALERTS}
    assert {"RlhfRpcErrorRatioHigh", "RlhfDeadLetters", "RlhfModelSwapFailed",
            "RlhfQueueBacklogGrowing", "RlhfRedisMemoryHigh"} <= names
    doc = (REPO / "docs" / "operations.md").read_text()
    for name in names:
        assert f"`{name}`" in doc, f"docs/operations.md does not describe {name}"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_every_alert_queries_exported_metrics_and_says_what_to_do(alert):
    check_query(alert["expr"], f"alert {alert['alert']}")
    assert alert["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = alert["annotations"]
    assert annotations.get("summary", "").strip(), "a one-line summary"
    assert len(annotations.get("description", "").split()) >= 10, "what it means, what to do"
    for text in annotations.values():  # Prometheus templates: only $labels and $value
        for ref in re.findall(r"\{\{(.*?)\}\}", text, re.S):
            assert re.search(r"\$labels\.\w+|\$value", ref), f"{alert['alert']}: {{{{{ref}}}}}"
            for label in re.findall(r"\$labels\.(\w+)", ref):
                assert re.search(rf"\b{label}\b", alert["expr"]), (
                    f"{alert['alert']}: $labels.{label} is not a label the expression keeps")
