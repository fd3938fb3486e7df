//! The tables of the guide's page on metrics and spans (`guide/observability.md`), read
//! so that tests can compare them with what the code records: `metrics` (feature
//! `metrics`, with `metrics-util`'s `DebuggingRecorder`) for the metric names and
//! labels, `spans` for the span fields. The tests here show the comparison fails on a
//! row the code lacks.

use std::collections::{BTreeMap, BTreeSet};

/// The page, as the crate docs include it.
pub(crate) const OBSERVABILITY: &str = include_str!("../../guide/observability.md");

/// One row of the metric table: a metric's name and the labels the guide lists for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetricRow {
    pub(crate) name: String,
    pub(crate) labels: Vec<String>,
}

/// The cells of a Markdown table row, or `None` for any other line.
fn cells(line: &str) -> Option<Vec<&str>> {
    let line = line.trim();
    let inner = line.strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The only code span of a cell that holds nothing else.
fn sole_code_span(cell: &str) -> Option<String> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.is_empty() && !inner.contains('`')).then(|| inner.to_owned())
}

/// The metric table's rows: a name in backticks, then its type (counter or histogram),
/// then its labels in backticks.
pub(crate) fn metrics(page: &str) -> Vec<MetricRow> {
    page.lines()
        .filter_map(cells)
        .filter(|row| row.len() >= 3)
        .filter(|row| row[1].starts_with("counter") || row[1].starts_with("histogram"))
        .filter_map(|row| {
            Some(MetricRow {
                name: sole_code_span(row[0])?,
                labels: code_spans(row[2]),
            })
        })
        .collect()
}

/// The span table's rows: `(span name, field)`, both in backticks.
pub(crate) fn span_fields(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter_map(cells)
        .filter(|row| row.len() == 3)
        .filter_map(|row| {
            let span = sole_code_span(row[0])?;
            let field = sole_code_span(row[1])?;
            span.starts_with("tokenflight.").then_some((span, field))
        })
        .collect()
}

/// Metric name → label keys, from keys written `name{k=v,k2=v2}` (as `metrics.rs`
/// prints the `DebuggingRecorder`'s snapshot).
pub(crate) fn recorded_names_and_labels<'a>(
    keys: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for key in keys {
        let (name, labels) = key.split_once('{').unwrap_or((key, "}"));
        let labels = labels.trim_end_matches('}');
        let entry = names.entry(name.to_owned()).or_default();
        for label in labels.split(',').filter(|l| !l.is_empty()) {
            entry.insert(label.split_once('=').map_or(label, |(k, _)| k).to_owned());
        }
    }
    names
}

/// What the guide lists that was not recorded: `name` for a metric, `name{label}` for a
/// label (except the labels in `everywhere`, checked separately).
pub(crate) fn listed_but_not_recorded(
    guide: &[MetricRow],
    recorded: &BTreeMap<String, BTreeSet<String>>,
    everywhere: &[&str],
) -> Vec<String> {
    let mut lacking = Vec::new();
    for row in guide {
        match recorded.get(&row.name) {
            None => lacking.push(row.name.clone()),
            Some(labels) => lacking.extend(
                row.labels
                    .iter()
                    .filter(|l| !everywhere.contains(&l.as_str()) && !labels.contains(*l))
                    .map(|l| format!("{}{{{l}}}", row.name)),
            ),
        }
    }
    lacking
}

/// The fields the guide lists for `span` that the span does not declare.
pub(crate) fn fields_not_declared(
    guide: &[(String, String)],
    span: &str,
    declared: &BTreeSet<String>,
) -> Vec<String> {
    guide
        .iter()
        .filter(|(name, field)| name == span && !declared.contains(field))
        .map(|(name, field)| format!("{name}.{field}"))
        .collect()
}

const SAMPLE: &str = "\
| metric | type | labels | what |
|---|---|---|---|
| `tokenflight.refresh.started` | counter | `reason`, `coordinator` | flights |
| `tokenflight.refresh.bogus` | counter | — | a name the code lacks |
| `tokenflight.refresh.outcome` | counter | `outcome`, `colour` | a label the code lacks |

| span | field | meaning |
|---|---|---|
| `tokenflight.refresh` | `reason` | why |
| `tokenflight.refresh` | `colour` | a field the code lacks |
";

#[test]
fn the_guide_page_has_both_tables() {
    assert!(metrics(OBSERVABILITY).len() >= 12);
    let fields = span_fields(OBSERVABILITY);
    assert!(
        fields.iter().any(|(s, _)| s == "tokenflight.refresh"),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|(s, _)| s == "tokenflight.request"),
        "{fields:?}"
    );
}

#[test]
fn a_metric_or_label_the_code_lacks_is_reported() {
    let recorded = recorded_names_and_labels([
        "tokenflight.refresh.started{coordinator=x,reason=initial}",
        "tokenflight.refresh.outcome{outcome=success}",
    ]);
    assert_eq!(
        listed_but_not_recorded(&metrics(SAMPLE), &recorded, &["coordinator"]),
        vec![
            "tokenflight.refresh.bogus".to_owned(),
            "tokenflight.refresh.outcome{colour}".to_owned()
        ]
    );
}

#[test]
fn a_span_field_the_code_lacks_is_reported() {
    let declared: BTreeSet<String> = ["flight", "reason"].map(str::to_owned).into();
    assert_eq!(
        fields_not_declared(&span_fields(SAMPLE), "tokenflight.refresh", &declared),
        vec!["tokenflight.refresh.colour".to_owned()]
    );
}
