//! `deploy/monitoring/`'s alerts: `promtool` accepts the rules and their
//! unit tests pass (series that fire each alert and series that must not),
//! the PrometheusRule holds exactly the plain rules file's groups, every
//! metric an expression names is one the agent exports and every label it or
//! an annotation uses is on those metrics (or the scrape's), and every alert
//! has a unit test and a runbook section in docs/operations.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grpclb_agent::observe::metrics::{
    render, FrontendGauges, LocalBackendGauges, Metrics, MetricsDetail, TableGauges, Watched,
};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn monitoring_dir() -> PathBuf {
    repo().join("deploy/monitoring")
}

const RULES: &str = "grpclb-rules.yaml";
const RULE_TESTS: &str = "grpclb-rules.test.yaml";
const PROMETHEUS_RULE: &str = "prometheusrule.yaml";

fn yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing YAML in {}", path.display()))
}

/// Runs `promtool` with `args` in deploy/monitoring (so the test file's
/// `rule_files` resolve), failing with everything it printed.
fn promtool(args: &[&str]) -> Result<()> {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .context("running promtool (Debian package prometheus; `cargo xtask test` installs it)")?;
    if !output.status.success() {
        bail!(
            "promtool {} failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() -> Result<()> {
    promtool(&["check", "rules", RULES])?;
    promtool(&["test", "rules", RULE_TESTS])
}

/// A rules file's alerts, as far as these tests read them (promtool checks
/// the rest, unknown fields included).
#[derive(Debug, Deserialize)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn rules() -> Result<Vec<Rule>> {
    let file: RuleFile = serde_json::from_value(yaml(&monitoring_dir().join(RULES))?)
        .with_context(|| format!("{RULES}: not a rules file of alerts"))?;
    Ok(file.groups.into_iter().flat_map(|g| g.rules).collect())
}

#[test]
fn the_prometheus_rule_holds_the_rules_files_groups() -> Result<()> {
    let plain = yaml(&monitoring_dir().join(RULES))?;
    let rule = yaml(&monitoring_dir().join(PROMETHEUS_RULE))?;
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "grpclb-system");
    let spec = rule["spec"]
        .as_object()
        .context("PrometheusRule has no spec")?;
    assert_eq!(
        spec.keys().collect::<Vec<_>>(),
        ["groups"],
        "{PROMETHEUS_RULE}: spec holds only the groups"
    );
    assert!(
        spec["groups"] == plain["groups"],
        "{PROMETHEUS_RULE}'s spec.groups differ from {RULES}'s groups: copy them over \
         (indented under spec)\n{RULES}:\n{}\n{PROMETHEUS_RULE}:\n{}",
        serde_yaml::to_string(&plain["groups"])?,
        serde_yaml::to_string(&spec["groups"])?
    );
    let listed = yaml(&monitoring_dir().join("kustomization.yaml"))?;
    assert!(
        listed["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f == PROMETHEUS_RULE)),
        "the monitoring kustomization does not list {PROMETHEUS_RULE}"
    );
    Ok(())
}

/// Sample names the agent's `/metrics` can carry, with their label names:
/// the samples of an exposition with every family recorded at least once (a
/// family without samples is left out of the text). A family the agent
/// gains later is missing here until it is recorded below, so a rule can
/// never pass on a name the agent lacks.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let metrics = Metrics::default();
    metrics.record_list(Watched::Services, 1);
    metrics.record_watch_error(Watched::Services);
    metrics.record_goaway("drain");
    metrics.record_move_abandoned("socket_gone");
    metrics.record_exchange_request("cluster", 100);
    metrics.record_exchange_served("subtree", 100);
    metrics.record_exchange_peer_error("node-b", "timeout");
    metrics.record_exchange_view(1, 2, Duration::from_millis(250));
    metrics.record_moves_waiting(BTreeMap::from([(
        ("10.244.0.1:8080".to_string(), "send_queue_busy"),
        1,
    )]));
    metrics.record_call_rates(BTreeMap::from([(
        (
            "10.244.0.1:8080".to_string(),
            "10.244.1.9:40000".to_string(),
        ),
        10.0,
    )]));
    let tables = TableGauges {
        frontends: vec![FrontendGauges {
            name: "apps/echo:grpc".into(),
            address: "10.96.0.1:80".into(),
            backends: 1,
            connections: 1,
            loads: Vec::new(),
        }],
        connections: vec![("10.244.0.1:8080".into(), 1)],
        views: vec![("10.244.0.1:8080".into(), 1)],
        local_connections: vec![(
            "apps/echo:grpc".into(),
            "10.96.0.1:80".into(),
            "10.244.0.1:8080".into(),
            1,
        )],
        maps: vec![("FRONTENDS", 1, 100)],
        local: BTreeMap::from([("10.244.0.1:8080".into(), LocalBackendGauges::default())]),
    };
    let text = render(&metrics, Some(tables), MetricsDetail::Backend);
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, _value) = line.rsplit_once(' ').expect("a sample: series value");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, label_names(labels)),
            None => (series, BTreeSet::new()),
        };
        families.entry(name.to_string()).or_default().extend(labels);
    }
    families
}

/// The label names of a sample's `l="v",...}` (values may hold `\"`).
fn label_names(labels: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = labels;
    while let Some((name, after)) = rest.split_once("=\"") {
        names.insert(name.trim_start_matches(',').to_string());
        let mut escaped = false;
        let end = after
            .char_indices()
            .find(|(_, c)| {
                let close = *c == '"' && !escaped;
                escaped = *c == '\\' && !escaped;
                close
            })
            .map(|(i, _)| i)
            .expect("a closing quote");
        rest = &after[end + 1..];
    }
    names
}

/// PromQL's binary keywords; every other word is a metric, a function or
/// aggregation (followed by `(`, `by` or `without`), a number, or a label
/// in a matcher or a `by`/`without`/`on`/`ignoring` list.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    /// The label names of a `{...}` selector.
    Matchers(Vec<String>),
    Open,
    Close,
    Other,
}

/// The words, parentheses and label matchers of `expr`, without ranges
/// and strings.
fn tokens(expr: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut in_string = false;
                let mut inside = String::new();
                for c in chars.by_ref() {
                    match c {
                        '"' => in_string = !in_string,
                        _ if c == close && !in_string => break,
                        _ if !in_string => inside.push(c),
                        _ => {}
                    }
                }
                if c == '{' {
                    let names = inside
                        .split(',')
                        .filter_map(|m| m.split(['=', '!']).next())
                        .map(|name| name.trim().to_string())
                        .filter(|name| !name.is_empty())
                        .collect();
                    tokens.push(Token::Matchers(names));
                }
            }
            '"' => {
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                }
            }
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            _ if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.' => {
                let mut word = c.to_string();
                while let Some(&c) = chars.peek() {
                    if !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.') {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
            _ if c.is_whitespace() => {}
            _ => tokens.push(Token::Other),
        }
    }
    tokens
}

/// What a PromQL expression names: the metrics it selects and every label
/// of its matchers and `by`/`without`/`on`/`ignoring`/`group_*` lists.
#[derive(Debug, Default, PartialEq)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn names(expr: &str) -> Names {
    let tokens = tokens(expr);
    let mut names = Names::default();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Word(word) => {
                let next = tokens.get(i + 1);
                let operator = matches!(next, Some(Token::Open))
                    || matches!(next, Some(Token::Word(w)) if LABEL_LISTS.contains(&w.as_str()));
                if LABEL_LISTS.contains(&word.as_str()) {
                    // Its parenthesised label list, if any (`group_left`
                    // may have none).
                    if next == Some(&Token::Open) {
                        i += 2;
                        while i < tokens.len() && tokens[i] != Token::Close {
                            if let Token::Word(label) = &tokens[i] {
                                names.labels.insert(label.clone());
                            }
                            i += 1;
                        }
                    }
                } else if !operator
                    && !KEYWORDS.contains(&word.as_str())
                    && !word.starts_with(|c: char| c.is_ascii_digit())
                {
                    names.metrics.insert(word.clone());
                }
            }
            Token::Matchers(labels) => names.labels.extend(labels.iter().cloned()),
            _ => {}
        }
        i += 1;
    }
    names
}

#[test]
fn names_are_the_selected_metrics_and_the_labels_used() {
    let found = names(
        r#"sum without (cause) (rate(a_total{x="}{", y=~"b", z!="c"}[5m])) > 0.05
           and max by (frontend, address) (b) / on (c) group_left c:d offset 5m
           or vector(0) * e{}"#,
    );
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        found,
        Names {
            metrics: set(&["a_total", "b", "c:d", "e"]),
            labels: set(&["address", "c", "cause", "frontend", "x", "y", "z"]),
        }
    );
}

/// Labels Prometheus adds to every series of a scrape (with
/// deploy/monitoring's PodMonitor, `node` from its relabeling).
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
    "node",
];

/// The `$labels.NAME` an annotation template uses.
fn template_labels(text: &str) -> BTreeSet<String> {
    text.split("$labels.")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_metric_and_label_the_rules_use_is_one_the_agent_exports() -> Result<()> {
    let exported = exported();
    for name in [
        "grpclb_ready",
        "grpclb_goaways_total",
        "grpclb_exchange_peer_errors_total",
        "grpclb_map_sync_duration_seconds_bucket",
        "grpclb_local_connections",
    ] {
        assert!(exported.contains_key(name), "{name} not in {exported:?}");
    }
    for rule in rules()? {
        let used = names(&rule.expr);
        let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for name in &used.metrics {
            // `up` is Prometheus's own, per scrape target.
            if name == "up" {
                continue;
            }
            let family = exported.get(name).with_context(|| {
                format!(
                    "alert {}: {name} is not a metric the agent exports (exported: {:?})",
                    rule.alert,
                    exported.keys()
                )
            })?;
            labels.extend(family.iter().cloned());
        }
        let templated = rule.annotations.values().flat_map(|t| template_labels(t));
        for label in used.labels.iter().cloned().chain(templated) {
            assert!(
                labels.contains(&label),
                "alert {}: label {label} is on none of {:?} (nor a target label)",
                rule.alert,
                used.metrics
            );
        }
    }
    Ok(())
}

/// What the unit tests expect of one alert at one time.
#[derive(Debug, Deserialize)]
struct AlertTest {
    alertname: String,
    #[serde(default)]
    exp_alerts: Vec<Value>,
}

#[test]
fn every_alert_has_unit_tests_that_fire_it_and_a_runbook_section() -> Result<()> {
    let tests = yaml(&monitoring_dir().join(RULE_TESTS))?;
    let mut fired = BTreeSet::new();
    for test in tests["tests"].as_array().context("no tests")? {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let case: AlertTest = serde_json::from_value(case.clone())?;
            if !case.exp_alerts.is_empty() {
                fired.insert(case.alertname);
            }
        }
    }
    let runbook = std::fs::read_to_string(repo().join("docs/operations.md"))
        .context("reading docs/operations.md")?;
    let headings: BTreeSet<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .collect();
    for rule in rules()? {
        let name = &rule.alert;
        assert!(fired.contains(name), "{RULE_TESTS}: nothing fires {name}");
        // A blip (one scrape, one failed sync) must not page anyone.
        assert!(
            !rule.for_.is_empty() && rule.for_ != "0s",
            "alert {name}: fires without waiting (`for`)"
        );
        assert!(
            headings.contains(name.as_str()),
            "docs/operations.md has no `### {name}` section"
        );
        assert_eq!(
            rule.annotations.get("runbook").map(String::as_str),
            Some(format!("docs/operations.md#{}", name.to_lowercase()).as_str()),
            "alert {name}: runbook annotation"
        );
        for key in ["summary", "description"] {
            assert!(rule.annotations.contains_key(key), "alert {name}: no {key}");
        }
        assert!(
            matches!(
                rule.labels.get("severity").map(String::as_str),
                Some("critical" | "warning")
            ),
            "alert {name}: severity must be critical or warning"
        );
    }
    Ok(())
}
