//! Grouped bar charts and line-chart panels as hand-written SVG (no
//! plotting dependency).

use std::fmt::Write as _;

/// Bars grouped by category (e.g. one group per pod), one bar per series
/// (e.g. per balancer) in each group.
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    /// Legend labels, one per series, in bar order.
    pub series: Vec<String>,
    pub groups: Vec<BarGroup>,
    /// A dashed horizontal line (label, value), e.g. the even share.
    pub reference: Option<(String, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BarGroup {
    pub label: String,
    /// One value per series.
    pub values: Vec<f64>,
}

const COLORS: [&str; 6] = [
    "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
];
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 70.0;
const PLOT_WIDTH: f64 = WIDTH - LEFT - RIGHT;
const PLOT_HEIGHT: f64 = HEIGHT - TOP - BOTTOM;
const Y_TICKS: u32 = 5;

/// The chart as a standalone SVG document. Bar heights are proportional to
/// the values, from a zero baseline to a "nice" maximum.
pub fn render_svg(chart: &BarChart) -> String {
    let data_max = chart
        .groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .chain(chart.reference.iter().map(|(_, v)| *v))
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(data_max);
    let y = |value: f64| TOP + PLOT_HEIGHT * (1.0 - value / y_max);

    let mut svg = svg_start(WIDTH, HEIGHT, &chart.title);

    for tick in 0..=Y_TICKS {
        let value = y_max * f64::from(tick) / f64::from(Y_TICKS);
        let ty = y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{}" y2="{ty:.1}" stroke="#ddd"/>"##,
            LEFT + PLOT_WIDTH
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            ty + 4.0,
            format_tick(value)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + PLOT_HEIGHT / 2.0,
        escape(&chart.y_label)
    );

    let group_width = PLOT_WIDTH / chart.groups.len().max(1) as f64;
    let bar_width = group_width * 0.8 / chart.series.len().max(1) as f64;
    for (g, group) in chart.groups.iter().enumerate() {
        let group_left = LEFT + group_width * g as f64 + group_width * 0.1;
        for (s, value) in group.values.iter().enumerate() {
            let x = group_left + bar_width * s as f64;
            let top = y(*value);
            let shown = format_value(*value);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {shown}</title></rect>"#,
                bar_width * 0.95,
                TOP + PLOT_HEIGHT - top,
                COLORS[s % COLORS.len()],
                escape(&format!("{} / {}", group.label, series_label(chart, s)))
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{shown}</text>"#,
                x + bar_width * 0.475,
                top - 3.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + group_width * (g as f64 + 0.5),
            TOP + PLOT_HEIGHT + 18.0,
            escape(&group.label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        TOP + PLOT_HEIGHT,
        LEFT + PLOT_WIDTH,
        TOP + PLOT_HEIGHT
    );

    if let Some((label, value)) = &chart.reference {
        let ry = y(*value);
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{ry:.1}" x2="{}" y2="{ry:.1}" stroke="black" stroke-dasharray="6 4"/>"#,
            LEFT + PLOT_WIDTH
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
            LEFT + PLOT_WIDTH,
            ry - 4.0,
            escape(label)
        );
    }

    for (s, label) in chart.series.iter().enumerate() {
        let lx = LEFT + 10.0 + 330.0 * (s % 2) as f64;
        let ly = HEIGHT - 30.0 + 16.0 * (s / 2) as f64;
        legend_entry(&mut svg, lx, ly, s, label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Line charts side by side, one panel each (e.g. one per balancer), on a
/// shared y axis so the panels compare at a glance.
#[derive(Clone, Debug, PartialEq)]
pub struct LinePanels {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub panels: Vec<Panel>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    /// One line each; a line's colour is its index, so the same index means
    /// the same thing (e.g. the same pod) in every panel.
    pub lines: Vec<Line>,
    /// A dashed vertical line (label, x), e.g. when pods were added.
    pub marker: Option<(String, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub label: String,
    /// (x, y) in increasing x.
    pub points: Vec<(f64, f64)>,
}

const PANEL_WIDTH: f64 = 300.0;
const PANEL_HEIGHT: f64 = 220.0;
const PANEL_GAP: f64 = 40.0;
const PANELS_PER_ROW: usize = 3;

/// The panels as a standalone SVG document: a grid of [`PANELS_PER_ROW`]
/// columns, x from 0 to the largest x, y from 0 to a nice maximum.
pub fn render_panels_svg(chart: &LinePanels) -> String {
    let points = || {
        chart
            .panels
            .iter()
            .flat_map(|p| &p.lines)
            .flat_map(|l| &l.points)
    };
    let x_max = points()
        .map(|(x, _)| *x)
        .chain(
            chart
                .panels
                .iter()
                .filter_map(|p| p.marker.as_ref().map(|m| m.1)),
        )
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let y_max = nice_ceiling(points().map(|(_, y)| *y).fold(0.0, f64::max));
    let legend_labels = chart
        .panels
        .iter()
        .max_by_key(|p| p.lines.len())
        .map(|p| p.lines.iter().map(|l| l.label.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let columns = chart.panels.len().clamp(1, PANELS_PER_ROW);
    let rows = chart.panels.len().div_ceil(PANELS_PER_ROW).max(1);
    let width = LEFT + columns as f64 * (PANEL_WIDTH + PANEL_GAP);
    let legend_top = TOP + rows as f64 * (PANEL_HEIGHT + 2.0 * PANEL_GAP);
    let height = legend_top + 20.0 * legend_labels.len().div_ceil(4).max(1) as f64 + 10.0;

    let mut svg = svg_start(width, height, &chart.title);
    for (index, panel) in chart.panels.iter().enumerate() {
        let left = LEFT + (index % PANELS_PER_ROW) as f64 * (PANEL_WIDTH + PANEL_GAP);
        let top = TOP + (index / PANELS_PER_ROW) as f64 * (PANEL_HEIGHT + 2.0 * PANEL_GAP);
        let x = |value: f64| left + PANEL_WIDTH * value / x_max;
        let y = |value: f64| top + PANEL_HEIGHT * (1.0 - value / y_max);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            left + PANEL_WIDTH / 2.0,
            top - 8.0,
            escape(&panel.title)
        );
        for tick in 0..=Y_TICKS {
            let value = y_max * f64::from(tick) / f64::from(Y_TICKS);
            let ty = y(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{left:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#ddd"/>"##,
                left + PANEL_WIDTH
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"#,
                left - 4.0,
                ty + 3.0,
                format_tick(value)
            );
        }
        for tick in 0..=4 {
            let value = x_max * f64::from(tick) / 4.0;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x(value),
                top + PANEL_HEIGHT + 14.0,
                format_tick((value * 10.0).round() / 10.0)
            );
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{left:.1}" y="{top:.1}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="black"/>"#
        );
        if let Some((label, at)) = &panel.marker {
            let _ = writeln!(
                svg,
                r#"<line x1="{0:.1}" y1="{top:.1}" x2="{0:.1}" y2="{1:.1}" stroke="black" stroke-dasharray="6 4"/>"#,
                x(*at),
                top + PANEL_HEIGHT
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                x(*at) + 3.0,
                top + 12.0,
                escape(label)
            );
        }
        for (l, line) in panel.lines.iter().enumerate() {
            let path: Vec<String> = line
                .points
                .iter()
                .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5"><title>{}</title></polyline>"#,
                path.join(" "),
                COLORS[l % COLORS.len()],
                escape(&line.label)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
            left + PANEL_WIDTH / 2.0,
            top + PANEL_HEIGHT + 28.0,
            escape(&chart.x_label)
        );
        if index % PANELS_PER_ROW == 0 {
            let _ = writeln!(
                svg,
                r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
                top + PANEL_HEIGHT / 2.0,
                escape(&chart.y_label)
            );
        }
    }
    for (l, label) in legend_labels.iter().enumerate() {
        let lx = LEFT + 150.0 * (l % 4) as f64;
        let ly = legend_top + 20.0 * (l / 4) as f64;
        legend_entry(&mut svg, lx, ly, l, label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// An SVG document on a white page with a centred title; close it with
/// `</svg>`.
fn svg_start(width: f64, height: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    svg
}

/// A colour swatch of series `index` and its label, the text's baseline at `ly`.
fn legend_entry(svg: &mut String, lx: f64, ly: f64, index: usize, label: &str) {
    let _ = writeln!(
        svg,
        r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/>"#,
        ly - 10.0,
        COLORS[index % COLORS.len()]
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{ly}">{}</text>"#,
        lx + 18.0,
        escape(label)
    );
}

fn series_label(chart: &BarChart, index: usize) -> &str {
    chart.series.get(index).map_or("", String::as_str)
}

/// The smallest 1, 2 or 5 × 10^k at or above `value` (1 for nothing to plot).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * magnitude)
}

fn format_tick(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Whole numbers as they are, others with two decimals (ratios).
fn format_value(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> BarChart {
        BarChart {
            title: "RPCs per pod".into(),
            y_label: "RPCs".into(),
            series: vec!["kube-proxy".into(), "grpclb".into()],
            groups: vec![
                BarGroup {
                    label: "server-a".into(),
                    values: vec![600.0, 300.0],
                },
                BarGroup {
                    label: "server-b".into(),
                    values: vec![300.0, 300.0],
                },
                BarGroup {
                    label: "server-c".into(),
                    values: vec![0.0, 300.0],
                },
            ],
            reference: Some(("even share".into(), 300.0)),
        }
    }

    /// (height, fill) of every bar, in document order.
    fn bars(svg: &str) -> Vec<(f64, String)> {
        svg.lines()
            .filter(|l| l.starts_with("<rect x=") && l.contains("<title>"))
            .map(|l| {
                let attr = |name: &str| {
                    let start = l.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                    l[start..].split('"').next().unwrap().to_string()
                };
                (attr("height").parse().unwrap(), attr("fill"))
            })
            .collect()
    }

    #[test]
    fn one_bar_per_value_with_heights_proportional_to_values() {
        let svg = render_svg(&chart());
        let bars = bars(&svg);
        assert_eq!(bars.len(), 6);
        let unit = bars[1].0 / 300.0;
        assert!(unit > 0.0);
        for ((height, _), value) in bars.iter().zip([600.0, 300.0, 300.0, 300.0, 0.0, 300.0]) {
            assert!((height - value * unit).abs() < 0.2, "{height} vs {value}");
        }
    }

    #[test]
    fn series_share_a_colour_and_the_legend_names_them() {
        let svg = render_svg(&chart());
        let bars = bars(&svg);
        assert_eq!(bars[0].1, bars[2].1);
        assert_ne!(bars[0].1, bars[1].1);
        assert!(svg.contains(">kube-proxy</text>"));
        assert!(svg.contains(">grpclb</text>"));
        assert!(svg.contains(">server-c</text>"));
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn text_is_escaped() {
        let mut c = chart();
        c.title = "a < b & \"c\"".into();
        let svg = render_svg(&c);
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
    }

    #[test]
    fn axis_maximum_is_a_nice_number_at_or_above_the_data() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
        assert_eq!(nice_ceiling(600.0), 1000.0);
        assert_eq!(nice_ceiling(1500.0), 2000.0);
        assert_eq!(nice_ceiling(4100.0), 5000.0);
    }

    fn panels() -> LinePanels {
        let line = |label: &str, points: &[(f64, f64)]| Line {
            label: label.into(),
            points: points.to_vec(),
        };
        LinePanels {
            title: "RPS per pod".into(),
            x_label: "seconds".into(),
            y_label: "RPS".into(),
            panels: vec![
                Panel {
                    title: "kube-proxy".into(),
                    lines: vec![
                        line("pod-1", &[(0.0, 100.0), (10.0, 100.0)]),
                        line("pod-2", &[(0.0, 0.0), (10.0, 50.0)]),
                    ],
                    marker: Some(("scale-up".into(), 5.0)),
                },
                Panel {
                    title: "grpclb & co".into(),
                    lines: vec![line("pod-1", &[(0.0, 50.0), (10.0, 50.0)])],
                    marker: None,
                },
            ],
        }
    }

    /// The (x, y) points of every polyline, in document order.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                let points = l
                    .split("points=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap();
                points
                    .split(' ')
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn panels_share_axes_and_lines_keep_their_colours() {
        let svg = render_panels_svg(&panels());
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 3);
        // Same y value, same height, in both panels (shared y axis).
        assert_eq!(lines[0][0].1, lines[0][1].1);
        let height_of = |line: &[(f64, f64)]| line[0].1;
        let zero = lines[1][0].1;
        let hundred = height_of(&lines[0]);
        let fifty = height_of(&lines[2]);
        assert!((zero - fifty - (fifty - hundred)).abs() < 0.2);
        // Later x further right, and the second panel right of the first.
        assert!(lines[0][1].0 > lines[0][0].0);
        assert!(lines[2][0].0 > lines[0][1].0);
        let colour = |n: usize| {
            svg.lines()
                .filter(|l| l.starts_with("<polyline"))
                .nth(n)
                .unwrap()
                .split("stroke=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(colour(0), colour(2));
        assert_ne!(colour(0), colour(1));
        assert!(svg.contains("grpclb &amp; co"));
        assert!(svg.contains(">scale-up</text>"));
        assert!(svg.contains(">pod-2</text>"));
        assert!(svg.ends_with("</svg>\n"));
    }

    #[test]
    fn fractional_bar_values_show_two_decimals() {
        let mut c = chart();
        c.groups[0].values = vec![1.5, 1.0];
        let svg = render_svg(&c);
        assert!(svg.contains(">1.50</text>"));
        assert!(svg.contains(">1</text>"));
    }

    #[test]
    fn empty_panels_still_render() {
        let svg = render_panels_svg(&LinePanels {
            title: "nothing".into(),
            x_label: "s".into(),
            y_label: "n".into(),
            panels: vec![],
        });
        assert!(svg.ends_with("</svg>\n"));
    }

    #[test]
    fn empty_chart_still_renders() {
        let svg = render_svg(&BarChart {
            title: "nothing".into(),
            y_label: "n".into(),
            series: vec![],
            groups: vec![],
            reference: None,
        });
        assert!(svg.ends_with("</svg>\n"));
    }
}
