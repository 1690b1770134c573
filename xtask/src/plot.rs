//! Grouped bar charts as hand-written SVG (no plotting dependency).

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
    pub values: Vec<u64>,
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
        .flat_map(|g| g.values.iter().map(|v| *v as f64))
        .chain(chart.reference.iter().map(|(_, v)| *v))
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(data_max);
    let y = |value: f64| TOP + PLOT_HEIGHT * (1.0 - value / y_max);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH / 2.0,
        escape(&chart.title)
    );

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
            let top = y(*value as f64);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {value}</title></rect>"#,
                bar_width * 0.95,
                TOP + PLOT_HEIGHT - top,
                COLORS[s % COLORS.len()],
                escape(&format!("{} / {}", group.label, series_label(chart, s)))
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{value}</text>"#,
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
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/>"#,
            ly - 10.0,
            COLORS[s % COLORS.len()]
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{ly}">{}</text>"#,
            lx + 18.0,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
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
                    values: vec![600, 300],
                },
                BarGroup {
                    label: "server-b".into(),
                    values: vec![300, 300],
                },
                BarGroup {
                    label: "server-c".into(),
                    values: vec![0, 300],
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
