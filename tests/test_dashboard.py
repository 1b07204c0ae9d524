"""The Grafana dashboard (deploy/grafana/) asks only for what a real scrape contains.

Grafana does not run here; instead every PromQL query in the dashboard (panels and
template variables) is read for the series and labels it names, and each must be in a real
scrape of the gateway's /metrics in front of a real llama-server (its llamacpp:* series
merged in), after real traffic: a generation, a refused key. `job` and `instance` are the
target labels Prometheus itself adds to every series it scrapes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ALICE, OPS, GatewayFactory
from support.chart import DASHBOARD
from support.procs import http_get

# Added by Prometheus to every scraped series (its target labels), never in /metrics.
TARGET_LABELS = {"job", "instance"}
# PromQL words that are not series: aggregations, functions are recognised by their "(".
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
# Aggregations may put their grouping before the parenthesis: sum by (x) (...).
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk"}
AGGREGATIONS |= {"bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass
class Query:
    """What one PromQL expression names: series, and the labels it uses on each."""

    series: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    grouping: set[str] = field(default_factory=set)


def read_query(expr: str) -> Query:
    """Series names, their matcher labels, and grouping labels (by/without/on/ignoring).

    Enough PromQL for dashboards: strings, ranges and label_values() are understood;
    a name followed by "(" is a function or an aggregation.
    """
    out = Query()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # matcher values never name anything
    text = re.sub(r"\[[^\]]*\]", "", text)  # [5m], [$__rate_interval]
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    position = 0
    while match := IDENT.search(text, position):
        name, position = match.group(), match.end()
        rest = text[position:].lstrip()
        if name in KEYWORDS:
            if rest.startswith("("):
                inner = rest[1 : rest.index(")")]
                out.grouping |= set(IDENT.findall(inner))
                position = text.index(")", position) + 1
            continue
        if name in AGGREGATIONS:
            continue
        if rest.startswith("("):
            if name == "label_values":
                # label_values(series, label): a Grafana variable query.
                args = [a.strip() for a in rest[1 : rest.index(")")].split(",")]
                out.series.add(args[0])
                out.labels[args[0]].add(args[1])
                position = text.index(")", position) + 1
            continue
        if re.fullmatch(r"[0-9.e+-]+", name):
            continue
        out.series.add(name)
        if rest.startswith("{"):
            matchers = rest[1 : rest.index("}")]
            out.labels[name] |= set(
                re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)
            )
            position = text.index("}", position) + 1
    return out


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_query_reader_finds_series_and_labels() -> None:
    q = read_query(
        'histogram_quantile(0.95, sum by (le) (rate(gateway_ttfb_bucket{job=~"$job"}[5m])))'
        ' / on (instance) group_left sum without (pod) (up{a="x", b!="}"})'
    )
    assert q.series == {"gateway_ttfb_bucket", "up"}
    assert q.labels["gateway_ttfb_bucket"] == {"job"} and q.labels["up"] == {"a", "b"}
    assert q.grouping == {"le", "instance", "pod"}
    assert read_query("label_values(gateway_backend_up, job)").labels == {
        "gateway_backend_up": {"job"}
    }


def test_every_dashboard_query_names_only_what_a_real_scrape_contains(
    make_gateway: GatewayFactory,
) -> None:
    # Per-key series appear only when /metrics needs a key (as the chart's perKey sets).
    gateway = make_gateway(METRICS_AUTH_ENABLED="true")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ALICE, max_retries=0)
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key="sk-not-a-key", max_retries=0
        ).models.list()
    status, body = http_get(gateway.port, "/metrics", {"Authorization": f"Bearer {OPS}"})
    assert status == 200
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    assert any(name.startswith("llamacpp:") for name in labels), "llama-server's series"

    problems = []
    grouping_known = set().union(*labels.values()) | TARGET_LABELS
    for expr in dashboard_queries():
        query = read_query(expr)
        assert query.series, f"no series read from: {expr}"
        for series in sorted(query.series):
            if series not in labels:
                problems.append(f"{series}: not in the scrape ({expr})")
                continue
            unknown = query.labels[series] - labels[series] - TARGET_LABELS
            if unknown:
                problems.append(f"{series}: no label {sorted(unknown)} ({expr})")
        unknown_grouping = query.grouping - grouping_known
        if unknown_grouping:
            problems.append(f"grouping by {sorted(unknown_grouping)}: in no series ({expr})")
    assert problems == [], "\n".join(problems)
