//! Line charts drawn on the server as inline SVG: no script, no library, readable without JavaScript.

use maud::{html, Markup};

/// Colours of the lines, in order (readable on white, distinct for the common kinds of colour blindness
/// as far as eight colours can be).
const PALETTE: [&str; 8] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#999999",
];

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// One line: its label and its points (Unix milliseconds, value).
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) points: Vec<(i64, f64)>,
}

/// The smallest "round" number (1, 2 or 5 times a power of ten) at or above `max`.
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * power >= max {
            return step * power;
        }
    }
    10.0 * power
}

fn label(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// The span a chart shows: the history there is, at least five minutes, at most `max_ms`.
pub(crate) fn window(series: &[Series], now_ms: i64, max_ms: i64) -> i64 {
    let oldest = series
        .iter()
        .filter_map(|s| s.points.first().map(|p| p.0))
        .min()
        .unwrap_or(now_ms);
    // Whole minutes, so that the axis labels are round.
    let span = (now_ms - oldest).div_euclid(60_000) * 60_000 + 60_000;
    span.clamp(5 * 60_000, max_ms)
}

/// A chart of `series` over the `window_ms` before `now_ms`, with a legend. `id` names it for tests and
/// scripts.
pub(crate) fn line_chart(
    id: &str,
    title: &str,
    series: &[Series],
    now_ms: i64,
    window_ms: i64,
) -> Markup {
    let window_ms = window_ms.max(60_000);
    let start = now_ms - window_ms;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: i64| LEFT + plot_w * ((t - start).max(0) as f64 / window_ms as f64);
    let y = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    let empty = series.iter().all(|s| s.points.is_empty());
    let minutes = window_ms / 60_000;
    html! {
        figure.chart id=(id) {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title)
                xmlns="http://www.w3.org/2000/svg" {
                @for (i, frac) in [0.0, 0.5, 1.0].iter().enumerate() {
                    @let gy = y(top * frac);
                    line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(gy) y2=(gy) stroke="#ddd" stroke-width="1" {}
                    text x=(LEFT - 4.0) y=(gy + 4.0) text-anchor="end" font-size="11" fill="#555" {
                        (label(top * frac))
                    }
                    @let tx = LEFT + plot_w * (i as f64 / 2.0);
                    text x=(tx) y=(HEIGHT - 6.0) font-size="11" fill="#555"
                        text-anchor=(["start", "middle", "end"][i]) {
                        @if i == 2 { "now" } @else { (format!("-{}m", minutes as f64 * (1.0 - i as f64 / 2.0))) }
                    }
                }
                @if empty {
                    text x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) text-anchor="middle"
                        font-size="13" fill="#888" { "no samples yet" }
                }
                @for (i, s) in series.iter().enumerate() {
                    @let colour = PALETTE[i % PALETTE.len()];
                    @let points: Vec<String> = s.points.iter()
                        .filter(|p| p.0 >= start)
                        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
                        .collect();
                    @if points.len() == 1 {
                        @let p = &s.points[s.points.len() - 1];
                        circle cx=(format!("{:.1}", x(p.0))) cy=(format!("{:.1}", y(p.1))) r="2.5" fill=(colour) {}
                    } @else if !points.is_empty() {
                        polyline points=(points.join(" ")) fill="none" stroke=(colour) stroke-width="1.8"
                            stroke-linejoin="round" {}
                    }
                }
            }
            @if !series.is_empty() {
                ul.legend {
                    @for (i, s) in series.iter().enumerate() {
                        li { svg.swatch viewBox="0 0 10 10" width="10" height="10" {
                                rect width="10" height="10" fill=(PALETTE[i % PALETTE.len()]) {} }
                            " " (s.label) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_ends_on_a_round_number() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(2.0), 2.0);
    }

    #[test]
    fn a_chart_draws_one_line_per_series_and_escapes_labels() {
        let now = 3_600_000;
        let series = vec![
            Series {
                label: "<q1>".into(),
                points: vec![(now - 60_000, 1.0), (now, 4.0)],
            },
            Series {
                label: "q2".into(),
                points: vec![],
            },
        ];
        let svg = line_chart("depth", "Pending", &series, now, 3_600_000).into_string();
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert!(svg.contains("&lt;q1&gt;") && !svg.contains("<q1>"));
        let empty = line_chart("depth", "Pending", &[], now, 3_600_000).into_string();
        assert!(empty.contains("no samples yet"));
    }
}
