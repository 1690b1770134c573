//! The demo's and the benches' charts, drawn as SVG with plotters: grouped
//! bar charts and line-chart panels on a shared axis. The chart types say
//! what to show; plotters lays it out.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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

/// ColorBrewer Dark2: tells series apart, also in grey print.
const COLORS: [RGBColor; 6] = [
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0xe6, 0xab, 0x02),
];
const FONT: &str = "sans-serif";
const BAR_SIZE: (u32, u32) = (720, 440);
const PANEL_SIZE: (u32, u32) = (340, 290);
const PANELS_PER_ROW: usize = 3;
const LEGEND_ROW: u32 = 22;
const LEGEND_COLUMN: i32 = 150;

fn color(index: usize) -> RGBColor {
    COLORS[index % COLORS.len()]
}

fn drawing_error(what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing {what}: {e}")
}

/// The chart as a standalone SVG document. Bar heights are proportional to
/// the values, from a zero baseline to a "nice" maximum; each bar carries
/// its value above it.
pub fn render_svg(chart: &BarChart) -> Result<String> {
    let mut svg = String::new();
    draw_bars(chart, &mut svg).map_err(|e| drawing_error(&chart.title, e))?;
    Ok(svg)
}

fn draw_bars(chart: &BarChart, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let data_max = chart
        .groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .chain(chart.reference.iter().map(|(_, v)| *v))
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(data_max);
    let groups = chart.groups.len().max(1);
    let bar_width = 0.8 / chart.series.len().max(1) as f64;

    let root = SVGBackend::with_string(svg, BAR_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, legend_area) =
        root.split_vertically(BAR_SIZE.1 - legend_height(chart.series.len(), 2));
    // Group i is centred on x = i, so the axis' whole-number ticks name the groups.
    let mut plot = ChartBuilder::on(&plot_area)
        .caption(&chart.title, (FONT, 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..groups as f64 - 0.5, 0.0..y_max)?;
    let group_label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        chart
            .groups
            .get(i as usize)
            .map_or(String::new(), |g| g.label.clone())
    };
    plot.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups + 1)
        .x_label_formatter(&group_label)
        .y_labels(6)
        .y_label_formatter(&|v| format_tick(*v))
        .y_desc(chart.y_label.as_str())
        .draw()?;

    let value_style =
        TextStyle::from((FONT, 10).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for s in 0..chart.series.len().max(1) {
        let bars = chart.groups.iter().enumerate().filter_map(|(g, group)| {
            let value = *group.values.get(s)?;
            let left = g as f64 - 0.4 + bar_width * s as f64;
            Some(Rectangle::new(
                [(left, 0.0), (left + bar_width * 0.95, value)],
                color(s).filled(),
            ))
        });
        plot.draw_series(bars)?;
        let labels = chart.groups.iter().enumerate().filter_map(|(g, group)| {
            let value = *group.values.get(s)?;
            let centre = g as f64 - 0.4 + bar_width * (s as f64 + 0.475);
            Some(
                EmptyElement::at((centre, value))
                    + Text::new(format_value(value), (0, -3), value_style.clone()),
            )
        });
        plot.draw_series(labels)?;
    }

    if let Some((label, value)) = &chart.reference {
        let right = groups as f64 - 0.5;
        plot.draw_series(DashedLineSeries::new(
            [(-0.5, *value), (right, *value)],
            6,
            4,
            BLACK.into(),
        ))?;
        plot.draw_series(std::iter::once(
            EmptyElement::at((right, *value))
                + Text::new(
                    label.clone(),
                    (-4, -4),
                    TextStyle::from((FONT, 11).into_font())
                        .pos(Pos::new(HPos::Right, VPos::Bottom)),
                ),
        ))?;
    }
    draw_legend(&legend_area, &chart.series, 2, 330)?;
    root.present()?;
    Ok(())
}

/// The panels as a standalone SVG document: a grid of [`PANELS_PER_ROW`]
/// columns, x from 0 to the largest x, y from 0 to a nice maximum, the same
/// in every panel.
pub fn render_panels_svg(chart: &LinePanels) -> Result<String> {
    let mut svg = String::new();
    draw_panels(chart, &mut svg).map_err(|e| drawing_error(&chart.title, e))?;
    Ok(svg)
}

fn draw_panels(chart: &LinePanels, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
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
    let legend_labels: Vec<String> = chart
        .panels
        .iter()
        .max_by_key(|p| p.lines.len())
        .map(|p| p.lines.iter().map(|l| l.label.clone()).collect())
        .unwrap_or_default();
    let columns = chart.panels.len().clamp(1, PANELS_PER_ROW);
    let rows = chart.panels.len().div_ceil(PANELS_PER_ROW).max(1);
    let title_height = 40;
    let legend = legend_height(legend_labels.len(), 4);
    let size = (
        PANEL_SIZE.0 * columns as u32,
        title_height + PANEL_SIZE.1 * rows as u32 + legend,
    );

    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (title_area, rest) = root.split_vertically(title_height);
    title_area.titled(&chart.title, (FONT, 16))?;
    let (grid, legend_area) = rest.split_vertically(PANEL_SIZE.1 * rows as u32);
    let cells = grid.split_evenly((rows, columns));
    for (index, (panel, area)) in chart.panels.iter().zip(&cells).enumerate() {
        let first_column = index % PANELS_PER_ROW == 0;
        let mut plot = ChartBuilder::on(area)
            .caption(&panel.title, (FONT, 13))
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(if first_column { 55 } else { 35 })
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        let mut mesh = plot.configure_mesh();
        mesh.x_labels(5)
            .y_labels(6)
            .x_label_formatter(&|v| format_tick((v * 10.0).round() / 10.0))
            .y_label_formatter(&|v| format_tick(*v))
            .x_desc(chart.x_label.as_str())
            .label_style((FONT, 10));
        if first_column {
            mesh.y_desc(chart.y_label.as_str());
        }
        mesh.draw()?;
        if let Some((label, at)) = &panel.marker {
            plot.draw_series(DashedLineSeries::new(
                [(*at, 0.0), (*at, y_max)],
                6,
                4,
                BLACK.into(),
            ))?;
            plot.draw_series(std::iter::once(
                EmptyElement::at((*at, y_max))
                    + Text::new(label.clone(), (3, 4), (FONT, 10).into_font()),
            ))?;
        }
        for (l, line) in panel.lines.iter().enumerate() {
            plot.draw_series(LineSeries::new(
                line.points.iter().copied(),
                color(l).stroke_width(2),
            ))?;
        }
    }
    draw_legend(&legend_area, &legend_labels, 4, LEGEND_COLUMN)?;
    root.present()?;
    Ok(())
}

/// Rows of `per_row` legend entries.
fn legend_height(entries: usize, per_row: usize) -> u32 {
    LEGEND_ROW * entries.div_ceil(per_row).max(1) as u32 + 10
}

/// A colour swatch and the label of each series, `per_row` to a row.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[String],
    per_row: usize,
    column_width: i32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for (index, label) in labels.iter().enumerate() {
        let x = 80 + column_width * (index % per_row) as i32;
        let y = 4 + LEGEND_ROW as i32 * (index / per_row) as i32;
        area.draw(&Rectangle::new(
            [(x, y), (x + 12, y + 12)],
            color(index).filled(),
        ))?;
        area.draw(&Text::new(
            label.clone(),
            (x + 18, y),
            (FONT, 12).into_font(),
        ))?;
    }
    Ok(())
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

    /// The value of attribute `name` in an SVG element's text.
    fn attr<'a>(element: &'a str, name: &str) -> Option<&'a str> {
        let start = element.find(&format!(" {name}=\""))? + name.len() + 3;
        element[start..].split('"').next()
    }

    /// (height, fill) of every filled `<rect>` of one of the series colours,
    /// in document order: the bars, then the legend swatches.
    fn coloured_rects(svg: &str) -> Vec<(f64, String)> {
        let colours: Vec<String> = COLORS
            .iter()
            .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
            .collect();
        svg.split('<')
            .filter(|e| e.starts_with("rect "))
            .filter_map(|e| {
                let fill = attr(e, "fill")?.to_uppercase();
                colours
                    .contains(&fill)
                    .then(|| (attr(e, "height").unwrap().parse().unwrap(), fill))
            })
            .collect()
    }

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|e| {
                let inner = e.split_once('>')?.1;
                Some(inner.split("</text>").next()?.trim().to_string())
            })
            .collect()
    }

    #[test]
    fn one_bar_per_value_with_heights_proportional_to_values() {
        let svg = render_svg(&chart()).unwrap();
        let rects = coloured_rects(&svg);
        // Series 0 (3 bars), series 1 (3 bars), then 2 legend swatches.
        assert_eq!(rects.len(), 8, "{svg}");
        let heights: Vec<f64> = rects[..6].iter().map(|r| r.0).collect();
        let unit = heights[1] / 300.0;
        assert!(unit > 0.0);
        for (height, value) in heights.iter().zip([600.0, 300.0, 0.0, 300.0, 300.0, 300.0]) {
            assert!((height - value * unit).abs() <= 1.0, "{height} vs {value}");
        }
    }

    #[test]
    fn series_share_a_colour_and_the_legend_and_axis_name_them() {
        let svg = render_svg(&chart()).unwrap();
        let rects = coloured_rects(&svg);
        assert_eq!(rects[0].1, rects[2].1);
        assert_ne!(rects[0].1, rects[3].1);
        assert_eq!(rects[6].1, rects[0].1);
        assert_eq!(rects[7].1, rects[3].1);
        let texts = texts(&svg);
        for text in [
            "kube-proxy",
            "grpclb",
            "server-a",
            "server-c",
            "even share",
            "RPCs per pod",
            "600",
            "RPCs",
        ] {
            assert!(
                texts.iter().any(|t| t == text),
                "{text} missing from {texts:?}"
            );
        }
        assert!(svg.contains("stroke-dasharray") || svg.matches("<line").count() > 2);
        assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn text_is_escaped() {
        let mut c = chart();
        c.title = "a < b & c".into();
        let svg = render_svg(&c).unwrap();
        assert!(texts(&svg).iter().any(|t| t == "a &lt; b &amp; c"), "{svg}");
    }

    #[test]
    fn fractional_bar_values_show_two_decimals() {
        let mut c = chart();
        c.groups[0].values = vec![1.5, 1.0];
        let svg = render_svg(&c).unwrap();
        let texts = texts(&svg);
        assert!(texts.iter().any(|t| t == "1.50"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "1"), "{texts:?}");
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

    /// (points, stroke) of every polyline drawn in a series colour.
    fn polylines(svg: &str) -> Vec<(Vec<(f64, f64)>, String)> {
        svg.split('<')
            .filter(|e| e.starts_with("polyline "))
            .filter_map(|e| {
                let stroke = attr(e, "stroke")?.to_uppercase();
                let points = attr(e, "points")?
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect();
                COLORS
                    .iter()
                    .any(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2) == stroke)
                    .then_some((points, stroke))
            })
            .collect()
    }

    #[test]
    fn panels_share_axes_and_lines_keep_their_colours() {
        let svg = render_panels_svg(&panels()).unwrap();
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 3, "{svg}");
        let y = |line: usize, point: usize| lines[line].0[point].1;
        // A flat line stays flat; 0, 50 and 100 are evenly spaced.
        assert_eq!(y(0, 0), y(0, 1));
        let (zero, fifty, hundred) = (y(1, 0), y(2, 0), y(0, 0));
        assert!(
            (zero - fifty - (fifty - hundred)).abs() <= 1.0,
            "{zero} {fifty} {hundred}"
        );
        // Later x further right, and the second panel right of the first.
        assert!(lines[0].0[1].0 > lines[0].0[0].0);
        assert!(lines[2].0[0].0 > lines[0].0[1].0);
        assert_eq!(lines[0].1, lines[2].1);
        assert_ne!(lines[0].1, lines[1].1);
        let texts = texts(&svg);
        for text in [
            "grpclb &amp; co",
            "scale-up",
            "pod-2",
            "RPS per pod",
            "seconds",
            "RPS",
        ] {
            assert!(
                texts.iter().any(|t| t == text),
                "{text} missing from {texts:?}"
            );
        }
    }

    #[test]
    fn empty_charts_still_render() {
        let svg = render_panels_svg(&LinePanels {
            title: "nothing".into(),
            x_label: "s".into(),
            y_label: "n".into(),
            panels: vec![],
        })
        .unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
        let svg = render_svg(&BarChart {
            title: "nothing".into(),
            y_label: "n".into(),
            series: vec![],
            groups: vec![],
            reference: None,
        })
        .unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
