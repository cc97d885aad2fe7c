//! Charts drawn on the server as SVG: each has a `<title>` and a `<desc>` that say what it shows
//! in words, and the page puts the same numbers in a table beside it, so a chart works without
//! JavaScript and with a screen reader.

use maud::{Markup, html};

/// One bar: what it is, how long it is, and its value as the page writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    /// What the bar stands for (a model's name).
    pub label: String,
    /// Its length, in any unit shared by the chart's bars.
    pub value: u64,
    /// The value as written beside the bar.
    pub text: String,
}

/// The width of a chart's drawing, in its own units; it is scaled to the page.
const WIDTH: u32 = 320;
/// The width kept for the bars' labels.
const LABEL_WIDTH: u32 = 110;
/// Room for a value written beside a bar.
const VALUE_WIDTH: u32 = 80;
/// One bar's row.
const ROW_HEIGHT: u32 = 28;

/// A horizontal bar chart. `id` makes the title and description ids unique on the page.
pub fn bars(id: &str, title: &str, description: &str, bars: &[Bar]) -> Markup {
    let longest = bars.iter().map(|bar| bar.value).max().unwrap_or(0).max(1);
    let height = ROW_HEIGHT * (bars.len() as u32).max(1) + 8;
    let span = WIDTH - LABEL_WIDTH - 8;
    let title_id = format!("{id}-title");
    let desc_id = format!("{id}-desc");
    html! {
        svg class="chart" id=(id) role="img" viewBox={"0 0 " (WIDTH) " " (height)}
            aria-labelledby={(title_id) " " (desc_id)} xmlns="http://www.w3.org/2000/svg" {
            title id=(title_id) { (title) }
            desc id=(desc_id) { (description) }
            @if bars.is_empty() {
                text x="4" y="20" class="chart-empty" { "Nothing yet" }
            }
            @for (index, bar) in bars.iter().enumerate() {
                @let y = 4 + ROW_HEIGHT * index as u32;
                // At least a sliver, so that a bar of a small value is still seen.
                @let length: u32 = if bar.value == 0 { 0 } else {
                    ((u128::from(bar.value) * u128::from(span) / u128::from(longest)) as u32).max(2)
                };
                // A long bar carries its value inside its end; a short one just past it.
                @let inside = length > VALUE_WIDTH;
                @let value_x = if inside { LABEL_WIDTH + length - 4 } else { LABEL_WIDTH + length + 4 };
                g class="bar" data-label=(bar.label) data-value=(bar.value) {
                    text x="0" y={(y + 17)} class="chart-label" { (bar.label) }
                    rect x=(LABEL_WIDTH) y={(y + 4)} width=(length) height="18" rx="3" {}
                    text x=(value_x) y={(y + 17)}
                        class=(if inside { "chart-value inside" } else { "chart-value" })
                        text-anchor=(if inside { "end" } else { "start" }) {
                        (bar.text)
                    }
                }
            }
        }
    }
}

/// One column of a column chart: a label (a day) and its parts, one per series, stacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// What the column stands for (`2026-12-05`).
    pub label: String,
    /// Its value in each series, in the order of the chart's series.
    pub parts: Vec<u64>,
}

/// The height of a column chart's plot, in its own units.
const COLUMNS_HEIGHT: u32 = 140;
/// Room below the plot for the first and last labels.
const COLUMNS_FOOT: u32 = 18;
/// Room left of the plot for the scale.
const COLUMNS_LEFT: u32 = 72;
/// The width of a column chart's drawing: wider than a bar chart's, for a month of days.
const COLUMNS_WIDTH: u32 = 640;

/// A column chart over time: one column per entry of `columns`, its parts stacked in the
/// order of `series` (named in a legend), scaled to the tallest column, whose total is written
/// at the top of the scale (`scale_text`).
pub fn columns(
    id: &str,
    title: &str,
    description: &str,
    series: &[String],
    columns: &[Column],
    scale_text: &str,
) -> Markup {
    let tallest = columns
        .iter()
        .map(|column| column.parts.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let count = (columns.len() as u32).max(1);
    let span = COLUMNS_WIDTH - COLUMNS_LEFT;
    let pitch = span / count;
    let width = pitch.saturating_sub(1).max(1);
    let legend_top = COLUMNS_HEIGHT + COLUMNS_FOOT + 6;
    let height = legend_top + 16 * (series.len() as u32).max(1);
    // Each column's parts, bottom up: (series, top, height), drawn only where not empty.
    let stacks: Vec<Vec<(usize, u32, u32)>> = columns
        .iter()
        .map(|column| {
            let mut base = COLUMNS_HEIGHT;
            let mut stack = Vec::new();
            for (series_index, part) in column.parts.iter().enumerate() {
                if *part == 0 {
                    continue;
                }
                let part_height = ((u128::from(*part) * u128::from(COLUMNS_HEIGHT - 4)
                    / u128::from(tallest)) as u32)
                    .max(1);
                base = base.saturating_sub(part_height);
                stack.push((series_index % SERIES_STYLES, base, part_height));
            }
            stack
        })
        .collect();
    let title_id = format!("{id}-title");
    let desc_id = format!("{id}-desc");
    html! {
        svg class="chart columns" id=(id) role="img" viewBox={"0 0 " (COLUMNS_WIDTH) " " (height)}
            aria-labelledby={(title_id) " " (desc_id)} xmlns="http://www.w3.org/2000/svg" {
            title id=(title_id) { (title) }
            desc id=(desc_id) { (description) }
            line class="axis-line" x1=(COLUMNS_LEFT) y1=(COLUMNS_HEIGHT) x2=(COLUMNS_WIDTH) y2=(COLUMNS_HEIGHT) {}
            text class="axis" x={(COLUMNS_LEFT - 4)} y="10" text-anchor="end" { (scale_text) }
            text class="axis" x={(COLUMNS_LEFT - 4)} y=(COLUMNS_HEIGHT) text-anchor="end" { "0" }
            @for (index, (column, stack)) in columns.iter().zip(&stacks).enumerate() {
                @let x = COLUMNS_LEFT + pitch * index as u32;
                g class="column" data-label=(column.label) data-value=(column.parts.iter().sum::<u64>()) {
                    @for (style, top, part_height) in stack {
                        rect class={"series-" (style)} x=(x) y=(top) width=(width) height=(part_height) {}
                    }
                }
            }
            @if let (Some(first), Some(last)) = (columns.first(), columns.last()) {
                text class="axis" x=(COLUMNS_LEFT) y={(COLUMNS_HEIGHT + 13)} { (first.label) }
                text class="axis" x=(COLUMNS_WIDTH) y={(COLUMNS_HEIGHT + 13)} text-anchor="end" { (last.label) }
            }
            @for (index, name) in series.iter().enumerate() {
                @let y = legend_top + 16 * index as u32;
                rect class={"series-" (index % SERIES_STYLES)} x=(COLUMNS_LEFT) y=(y) width="10" height="10" {}
                text class="axis" x={(COLUMNS_LEFT + 14)} y={(y + 9)} { (name) }
            }
        }
    }
}

/// The fills the stylesheet has for series (`series-0` …), reused in turn past the last.
const SERIES_STYLES: usize = 6;

/// The side of a Lorenz chart's square, in its own units.
const LORENZ_SIDE: u32 = 240;
/// The margin around it, for the axes' labels.
const LORENZ_MARGIN: u32 = 44;

/// A Lorenz curve: the share of all compute (up) used by the poorest share of people (across),
/// through `points` (the poorest 0 %, 10 %, …, 100 %), under the diagonal of perfect equality.
pub fn lorenz(id: &str, title: &str, description: &str, points: &[f64]) -> Markup {
    let side = f64::from(LORENZ_SIDE);
    let margin = f64::from(LORENZ_MARGIN);
    let last = points.len().saturating_sub(1).max(1) as f64;
    let at = |index: usize, share: f64| {
        let x = margin + side * index as f64 / last;
        let y = margin + side * (1.0 - share.clamp(0.0, 1.0));
        format!("{x:.1},{y:.1}")
    };
    let curve: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(index, share)| at(index, *share))
        .collect();
    let full = LORENZ_SIDE + 2 * LORENZ_MARGIN;
    let (left, top, right, bottom) = (
        LORENZ_MARGIN,
        LORENZ_MARGIN,
        LORENZ_MARGIN + LORENZ_SIDE,
        LORENZ_MARGIN + LORENZ_SIDE,
    );
    let title_id = format!("{id}-title");
    let desc_id = format!("{id}-desc");
    html! {
        svg class="chart lorenz" id=(id) role="img" viewBox={"0 0 " (full) " " (full)}
            aria-labelledby={(title_id) " " (desc_id)} xmlns="http://www.w3.org/2000/svg" {
            title id=(title_id) { (title) }
            desc id=(desc_id) { (description) }
            rect class="frame" x=(left) y=(top) width=(LORENZ_SIDE) height=(LORENZ_SIDE) {}
            line class="equality" x1=(left) y1=(bottom) x2=(right) y2=(top) {}
            polygon class="gap" points={(at(0, 0.0)) " " (curve.join(" ")) " " (at(points.len().saturating_sub(1), 1.0))} {}
            polyline class="curve" points=(curve.join(" ")) {}
            text x=(left) y={(bottom + 16)} class="axis" { "0 %" }
            text x=(right) y={(bottom + 16)} class="axis" text-anchor="end" { "100 % of people" }
            text x={(left - 4)} y={(bottom)} class="axis" text-anchor="end" { "0" }
            text x={(left - 4)} y={(top + 10)} class="axis" text-anchor="end" { "100 %" }
            text x={(left + 4)} y={(top - 8)} class="axis" { "share of compute used" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_as_long_as_their_values_and_say_what_they_show() {
        let svg = bars(
            "usage",
            "Compute used this period",
            "Per model",
            &[
                Bar {
                    label: "a".into(),
                    value: 100,
                    text: "100 GFLOP".into(),
                },
                Bar {
                    label: "b".into(),
                    value: 50,
                    text: "50 GFLOP".into(),
                },
                Bar {
                    label: "c".into(),
                    value: 0,
                    text: "0 FLOP".into(),
                },
            ],
        )
        .into_string();
        assert!(
            svg.contains("<title id=\"usage-title\">Compute used this period</title>"),
            "{svg}"
        );
        assert!(
            svg.contains("<desc id=\"usage-desc\">Per model</desc>"),
            "{svg}"
        );
        let span = WIDTH - LABEL_WIDTH - 8;
        assert!(svg.contains(&format!("width=\"{span}\"")), "{svg}");
        assert!(svg.contains(&format!("width=\"{}\"", span / 2)), "{svg}");
        assert!(svg.contains("width=\"0\""), "{svg}");
    }

    #[test]
    fn columns_stack_their_parts_to_scale() {
        let svg = columns(
            "days",
            "Compute used per day",
            "d",
            &["a".to_string(), "b".to_string()],
            &[
                Column {
                    label: "12-01".into(),
                    parts: vec![0, 0],
                },
                Column {
                    label: "12-02".into(),
                    parts: vec![100, 36],
                },
                Column {
                    label: "12-03".into(),
                    parts: vec![68, 0],
                },
            ],
            "136 GFLOP",
        )
        .into_string();
        // The tallest column fills the plot (136 cu over 136 units): 100 + 36.
        assert!(
            svg.contains(r#"class="series-0" x="261" y="40" width="188" height="100""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"class="series-1" x="261" y="4" width="188" height="36""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"class="series-0" x="450" y="72" width="188" height="68""#),
            "{svg}"
        );
        // An empty day has a column and no bar.
        assert!(
            svg.contains(r#"data-label="12-01" data-value="0"></g>"#),
            "{svg}"
        );
    }

    #[test]
    fn labels_are_escaped() {
        let svg = bars(
            "x",
            "t",
            "d",
            &[Bar {
                label: "<script>".into(),
                value: 1,
                text: "1".into(),
            }],
        )
        .into_string();
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
    }
}
