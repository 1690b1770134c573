//! A real Prometheus (Debian's `prometheus` 2.42 at /usr/bin) scraping the
//! agents of a test, its HTTP query API, `promtool check metrics`, and the
//! Grafana dashboard (`deploy/monitoring/grpclb-dashboard.json`) whose
//! panel queries are the ones the docs give (issue 13).
//!
//! Prometheus listens on 127.0.0.1 and scrapes loopback addresses only; it
//! runs in the test's own namespaces (agents serve `/metrics` there) with
//! its storage in a temporary directory, and is killed by PID on drop.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{http_get, wait_until, ChildGuard, SimCluster};

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";

/// How often the test Prometheus scrapes: short, so a test sees a change
/// within a few seconds.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// The dashboard, relative to the workspace root.
pub const DASHBOARD: &str = "deploy/monitoring/grpclb-dashboard.json";

/// One scrape target: an agent's metrics address and its node's name (the
/// `node` label of its series).
#[derive(Clone, Debug)]
pub struct Target {
    pub node: String,
    pub addr: SocketAddr,
}

/// Every agent of `cluster`, as a scrape target named for its node.
pub fn targets_of(cluster: &mut SimCluster) -> Result<Vec<Target>> {
    (0..cluster.node_count())
        .map(|node| {
            Ok(Target {
                node: cluster.node_name(node).to_string(),
                addr: cluster.agent(node)?.metrics_addr()?,
            })
        })
        .collect()
}

/// `prometheus.yml` scraping `targets` every `interval` (job `grpclb`).
pub fn config_yaml(targets: &[Target], interval: Duration) -> String {
    let interval = format!("{}ms", interval.as_millis());
    let mut out = format!(
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n  - job_name: grpclb\n    static_configs:\n"
    );
    for t in targets {
        out.push_str(&format!(
            "      - targets: ['{}']\n        labels:\n          node: '{}'\n",
            t.addr, t.node
        ));
    }
    out
}

/// One sample of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, empty when the sample has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The samples of a `/api/v1/query` answer (an instant vector, or a
/// scalar as one sample without labels); an error answer's message.
pub fn parse_query_response(body: &str) -> Result<Vec<Sample>> {
    let answer: Value = serde_json::from_str(body)
        .with_context(|| format!("Prometheus answered with something not JSON: {body:?}"))?;
    if answer["status"] != "success" {
        bail!(
            "Prometheus: {} ({})",
            answer["error"].as_str().unwrap_or("no error message"),
            answer["errorType"].as_str().unwrap_or("no error type")
        );
    }
    let data = &answer["data"];
    let value = |pair: &Value| -> Result<f64> {
        let text = pair[1]
            .as_str()
            .with_context(|| format!("a sample without a value: {pair}"))?;
        // Prometheus writes NaN and infinities as Go does.
        match text {
            "NaN" => Ok(f64::NAN),
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            _ => text
                .parse()
                .with_context(|| format!("sample value {text:?} is not a number")),
        }
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .context("a vector answer without a result list")?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .context("a sample without labels")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                Ok(Sample {
                    labels,
                    value: value(&s["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value(&data["result"])?,
        }]),
        other => bail!("Prometheus answered a {other:?} result; the tests ask instant queries"),
    }
}

/// A running Prometheus; drop kills it by PID (its storage directory goes
/// with it).
pub struct Prometheus {
    // Drops before the directory holding its storage.
    process: ChildGuard,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port scraping `targets` every
    /// [`SCRAPE_INTERVAL`], and waits until it has scraped every target
    /// successfully.
    pub fn start(targets: &[Target]) -> Result<Prometheus> {
        require_tool(PROMETHEUS_BIN)?;
        let dir = tempfile::tempdir().context("creating Prometheus' directory")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets, SCRAPE_INTERVAL))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = File::create(dir.path().join("prometheus.log"))
            .context("creating Prometheus' log file")?;
        let addr = free_loopback_port()?;
        let process = ChildGuard::start_here(
            Command::new(PROMETHEUS_BIN)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("sharing the log file")?)
                .stderr(log),
        )?;
        let mut prometheus = Prometheus { process, addr, dir };
        wait_until("Prometheus to be ready", Duration::from_secs(20), || {
            if let Some(exit) = prometheus.process.try_wait() {
                bail!("Prometheus exited ({exit}): {}", prometheus.log());
            }
            Ok(http_get(addr, "/-/ready")
                .ok()
                .filter(|(code, _)| *code == 200))
        })?;
        let want = targets.len();
        wait_until(
            &format!("Prometheus to scrape all {want} agents"),
            Duration::from_secs(20),
            || {
                let up = prometheus.query("up == 1")?;
                Ok((up.len() == want).then_some(()))
            },
        )
        .with_context(|| prometheus.log())?;
        Ok(prometheus)
    }

    /// The instant query `expr` evaluated now.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?{query}"))
            .with_context(|| format!("querying Prometheus at {} for {expr}", self.addr))?;
        parse_query_response(&body).with_context(|| format!("query {expr} (HTTP {code})"))
    }

    /// `query` until `check` accepts its samples (its `Some`), or fails
    /// after `timeout` with the last samples seen.
    pub fn await_query<T>(
        &self,
        what: &str,
        expr: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Sample]) -> Option<T>,
    ) -> Result<T> {
        let mut last = Vec::new();
        wait_until(what, timeout, || {
            last = self.query(expr)?;
            Ok(check(&last))
        })
        .with_context(|| format!("query: {expr}\nlast answer: {last:?}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// A loopback port nothing listens on (the kernel's choice; released for
/// Prometheus to bind right after).
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free loopback port for Prometheus")?;
    Ok(listener.local_addr()?)
}

fn require_tool(path: &str) -> Result<()> {
    if !Path::new(path).is_file() {
        bail!("{path} is missing: install Debian's prometheus package (`cargo xtask test` does)");
    }
    Ok(())
}

/// `promtool check metrics` on an exposition (what `/metrics` served):
/// fails with promtool's findings, lint problems included.
pub fn check_metrics(exposition: &str) -> Result<()> {
    require_tool(PROMTOOL_BIN)?;
    let mut child = Command::new(PROMTOOL_BIN)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool check metrics")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(exposition.as_bytes())
        .context("writing the exposition to promtool")?;
    let output = child.wait_with_output().context("waiting for promtool")?;
    if !output.status.success() {
        bail!(
            "promtool check metrics ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The samples of family `name` in an exposition (the text `/metrics`
/// serves), with their labels; a counter is named with its `_total`.
pub fn exposition_samples(exposition: &str, name: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => {
                let (labels, value) =
                    parse_labels(rest).with_context(|| format!("labels of {line:?}"))?;
                (labels, value)
            }
            None if rest.starts_with(' ') => (BTreeMap::new(), rest),
            // Another family sharing the prefix.
            None => continue,
        };
        let value = value
            .trim()
            .parse()
            .with_context(|| format!("value of {line:?}"))?;
        samples.push(Sample { labels, value });
    }
    Ok(samples)
}

/// `k="v",...}` and what follows the closing brace; values may hold
/// escaped quotes and backslashes.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").context("a label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("an escape at the end"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("an unterminated label value"),
            }
        };
        labels.insert(key.to_string(), value);
        rest = &after[end + 1..];
    }
}

/// One query of a dashboard panel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanelQuery {
    pub panel: String,
    pub ref_id: String,
    /// As written in the dashboard (with its variables).
    pub expr: String,
}

/// The Grafana dashboard's queries and the values its variables take
/// when "All" is chosen.
#[derive(Clone, Debug)]
pub struct Dashboard {
    pub queries: Vec<PanelQuery>,
    /// Query variables: (name, value for "All").
    pub variables: Vec<(String, String)>,
    /// (variable, metric, label) of each `label_values(metric, label)`.
    pub label_values: Vec<(String, String, String)>,
}

impl Dashboard {
    pub fn load(path: &Path) -> Result<Dashboard> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Dashboard::parse(&text).with_context(|| format!("dashboard {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Dashboard> {
        let json: Value = serde_json::from_str(text).context("not JSON")?;
        let mut queries = Vec::new();
        let panels = json["panels"]
            .as_array()
            .context("no panels: a dashboard lists them in `panels`")?;
        collect_queries(panels, &mut queries)?;
        let mut variables = Vec::new();
        let mut label_values = Vec::new();
        let list = json["templating"]["list"].as_array();
        for v in list.into_iter().flatten() {
            let name = v["name"].as_str().context("a variable without a name")?;
            if v["type"] != "query" {
                continue;
            }
            let all = v["allValue"].as_str().with_context(|| {
                format!("variable {name}: no allValue; set one (e.g. \".+\") so \"All\" is a regex every query takes")
            })?;
            variables.push((name.to_string(), all.to_string()));
            let definition = v["definition"].as_str().unwrap_or_default();
            let (metric, label) = parse_label_values(definition).with_context(|| {
                format!(
                    "variable {name}: definition {definition:?} is not label_values(METRIC, LABEL)"
                )
            })?;
            label_values.push((name.to_string(), metric, label));
        }
        Ok(Dashboard {
            queries,
            variables,
            label_values,
        })
    }

    /// The query of panel `title` (its only one), with variables set for
    /// "All" and `$__rate_interval` as `rate_interval`.
    pub fn query(&self, title: &str, rate_interval: &str) -> Result<String> {
        let mut found = self.queries.iter().filter(|q| q.panel == title);
        let query = found
            .next()
            .with_context(|| format!("the dashboard has no panel titled {title:?}"))?;
        if found.next().is_some() {
            bail!("panel {title:?} has several queries; name one by its refId");
        }
        self.substitute(query, rate_interval)
    }

    /// The query `ref_id` of panel `title`, variables set as [`Dashboard::query`] sets them.
    pub fn query_ref(&self, title: &str, ref_id: &str, rate_interval: &str) -> Result<String> {
        let query = self
            .queries
            .iter()
            .find(|q| q.panel == title && q.ref_id == ref_id)
            .with_context(|| {
                format!("the dashboard has no query {ref_id} in a panel titled {title:?}")
            })?;
        self.substitute(query, rate_interval)
    }

    /// `query`'s expression with every variable replaced: the dashboard's
    /// own by their "All" value, `$__rate_interval` by `rate_interval`.
    pub fn substitute(&self, query: &PanelQuery, rate_interval: &str) -> Result<String> {
        let mut expr = query.expr.clone();
        let builtins = [("__rate_interval".to_string(), rate_interval.to_string())];
        // Longest names first, so `$ab` is not taken for `$a` followed by `b`.
        let mut all: Vec<&(String, String)> = self.variables.iter().chain(&builtins).collect();
        all.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
        for (name, value) in all {
            expr = expr
                .replace(&format!("${{{name}}}"), value)
                .replace(&format!("${name}"), value);
        }
        if let Some(at) = expr.find('$') {
            bail!(
                "panel {:?} query {}: unknown variable at {:?}; define it in templating.list or use one of {:?}",
                query.panel,
                query.ref_id,
                &expr[at..],
                self.variables.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
        }
        Ok(expr)
    }
}

fn collect_queries(panels: &[Value], out: &mut Vec<PanelQuery>) -> Result<()> {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if let Some(nested) = panel["panels"].as_array() {
            collect_queries(nested, out)?;
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: a target without expr"))?;
            out.push(PanelQuery {
                panel: title.clone(),
                ref_id: target["refId"].as_str().unwrap_or_default().to_string(),
                expr: expr.to_string(),
            });
        }
    }
    Ok(())
}

/// (metric, label) of Grafana's `label_values(metric, label)`.
fn parse_label_values(definition: &str) -> Option<(String, String)> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (metric, label) = inner.split_once(',')?;
    Some((metric.trim().to_string(), label.trim().to_string()))
}

/// The ```promql blocks of a Markdown text, each as one line (lines joined
/// by a space), in order.
pub fn promql_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim()) {
            (None, "```promql") => current = Some(Vec::new()),
            (Some(lines), "```") => {
                blocks.push(lines.join(" "));
                current = None;
            }
            (Some(lines), l) => lines.push(l),
            (None, _) => {}
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_samples_read_labels_and_values_of_one_family() {
        let text =
            "# TYPE a gauge\na{x=\"1\",y=\"q\\\"\\\\\"} 3\na_total 4\nab{x=\"2\"} 5\na 6.5\n";
        let a = exposition_samples(text, "a").unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(a[0].label("x"), "1");
        assert_eq!(a[0].label("y"), "q\"\\");
        assert_eq!(a[0].value, 3.0);
        assert_eq!(a[1].value, 6.5);
        assert_eq!(exposition_samples(text, "a_total").unwrap()[0].value, 4.0);
    }

    #[test]
    fn config_names_every_target_and_its_node() {
        let yaml = config_yaml(
            &[
                Target {
                    node: "n0".into(),
                    addr: "127.0.0.1:4000".parse().unwrap(),
                },
                Target {
                    node: "n1".into(),
                    addr: "127.0.0.1:4001".parse().unwrap(),
                },
            ],
            Duration::from_secs(1),
        );
        let config: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(config["global"]["scrape_interval"], "1000ms");
        let statics = &config["scrape_configs"][0]["static_configs"];
        assert_eq!(statics[1]["targets"][0], "127.0.0.1:4001");
        assert_eq!(statics[1]["labels"]["node"], "n1");
    }

    #[test]
    fn query_answers_parse_to_samples_or_name_the_error() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"backend":"10.244.0.1:50051"},"value":[1700000000.1,"250.5"]},
            {"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        let samples = parse_query_response(vector).unwrap();
        assert_eq!(samples[0].label("backend"), "10.244.0.1:50051");
        assert_eq!(samples[0].value, 250.5);
        assert!(samples[1].value.is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert_eq!(parse_query_response(scalar).unwrap()[0].value, 2.0);
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        let e = parse_query_response(error).unwrap_err().to_string();
        assert!(e.contains("parse error at char 3"), "{e}");
    }

    const DASHBOARD_JSON: &str = r#"{
        "templating": {"list": [
            {"name": "datasource", "type": "datasource"},
            {"name": "frontend", "type": "query", "allValue": ".+",
             "definition": "label_values(grpclb_frontend_backends, frontend)"}]},
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "nested", "targets": [{"refId": "A", "expr": "up"}]}]},
            {"title": "calls", "targets": [{"refId": "A",
             "expr": "rate(x{frontend=~\"$frontend\"}[$__rate_interval])"}]},
            {"title": "two", "targets": [{"refId": "A", "expr": "a"}, {"refId": "B", "expr": "${nope}"}]}]
    }"#;

    #[test]
    fn dashboard_queries_come_with_their_variables_set() {
        let d = Dashboard::parse(DASHBOARD_JSON).unwrap();
        assert_eq!(d.queries.len(), 4);
        assert_eq!(d.query("nested", "4s").unwrap(), "up");
        assert_eq!(
            d.query("calls", "4s").unwrap(),
            "rate(x{frontend=~\".+\"}[4s])"
        );
        assert_eq!(
            d.label_values,
            vec![(
                "frontend".to_string(),
                "grpclb_frontend_backends".to_string(),
                "frontend".to_string()
            )]
        );
        let e = d.query("two", "4s").unwrap_err().to_string();
        assert!(e.contains("several queries"), "{e}");
        assert_eq!(d.query_ref("two", "A", "4s").unwrap(), "a");
        let e = d.query_ref("two", "C", "4s").unwrap_err().to_string();
        assert!(e.contains("no query C in a panel titled \"two\""), "{e}");
        let e = d.substitute(&d.queries[3], "4s").unwrap_err().to_string();
        assert!(e.contains("unknown variable at \"${nope}\""), "{e}");
        let e = d.query("missing", "4s").unwrap_err().to_string();
        assert!(e.contains("no panel titled \"missing\""), "{e}");
    }

    #[test]
    fn a_query_variable_needs_an_all_value() {
        let e = Dashboard::parse(
            r#"{"panels": [], "templating": {"list": [{"name": "f", "type": "query"}]}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("variable f: no allValue"), "{e}");
    }

    #[test]
    fn promql_blocks_are_read_whole_and_in_order() {
        let md = "text\n```promql\nsum by (a) (\n  x\n)\n```\n```\nnot promql\n```\n```promql\nup\n```\n";
        assert_eq!(promql_blocks(md), vec!["sum by (a) ( x )", "up"]);
    }
}
