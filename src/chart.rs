//! The adoption chart of a rotation: the hourly share of the owner's traffic on the new key
//! since the rotation started, with the deadline and the forecast completion marked, as a
//! PNG; and the same series as a terminal sparkline.
//!
//! Contract: a pure function of the rotation view ([`RotationStatus`], what `keywatch
//! rotations` prints and what the notifier is given), so the picture and the numbers
//! around it never disagree. [`AdoptionChart::from_status`] is the data drawn; the PNG
//! carries it as JSON in a `tEXt` chunk named [`DATA_CHUNK`], so a reader (a test, a person
//! with `pngcheck -t`) can see exactly what was plotted. No IO: the caller writes the bytes.
//!
//! Text is drawn with a font embedded in the binary (a 14 KB subset of DejaVu Sans,
//! `assets/fonts/`), not found through the host's font configuration: a daemon in a minimal
//! container draws the same chart as a laptop. Times on the axis are in the owner's time
//! zone, like the deadline in the message. Drawn with plotters' bitmap backend into an RGB
//! buffer and encoded by the `png` crate (plotters' own encoder would bring the `image`
//! crate and its codecs for one format).

use std::sync::Once;

use chrono::TimeZone;
use chrono_tz::Tz;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use serde::Serialize;

use crate::detect::{Phase, RotationStatus};

/// Pixels: wide enough for a mail client's reading pane, sharp on a phone.
pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 300;
/// The `tEXt` keyword under which the PNG carries the plotted data.
pub const DATA_CHUNK: &str = "keywatch-adoption";

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
const FONT: &str = "keywatch-sans";
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");
static REGISTER: Once = Once::new();

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no hourly traffic since the rotation started: nothing to draw")]
    NoData,
    #[error("cannot draw the chart: {0}")]
    Draw(String),
    #[error("cannot encode the chart as PNG: {0}")]
    Encode(String),
}

/// One hour of the series: the share of that hour's requests that used the new key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub hour_ms: i64,
    pub share: f64,
    pub requests: u64,
}

/// What the chart shows, taken from the rotation view as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdoptionChart {
    pub old_key: String,
    pub new_key: String,
    pub timezone: String,
    pub started_ms: i64,
    pub deadline_ms: i64,
    pub phase: String,
    /// The share over the last 24 hours, the number the message states.
    pub share_24h: Option<f64>,
    pub points: Vec<Point>,
    /// When the fitted line reaches 100 %, and its slope (share per day).
    pub forecast_ms: Option<i64>,
    pub slope_per_day: Option<f64>,
    pub stalled: bool,
}

impl AdoptionChart {
    pub fn from_status(s: &RotationStatus) -> AdoptionChart {
        AdoptionChart {
            old_key: s.old_key.clone(),
            new_key: s.new_key.clone(),
            timezone: s.timezone.clone(),
            started_ms: s.started_ms,
            deadline_ms: s.deadline_ms,
            phase: s.phase.as_str().to_owned(),
            share_24h: s.share_24h,
            points: s
                .share
                .iter()
                .map(|p| Point {
                    hour_ms: p.hour_ms,
                    share: p.share,
                    requests: p.requests,
                })
                .collect(),
            forecast_ms: s.forecast.completion_ms,
            slope_per_day: s.forecast.slope_per_day,
            stalled: s.forecast.stalled,
        }
    }

    fn tz(&self) -> Tz {
        self.timezone.parse().unwrap_or(Tz::UTC)
    }

    /// The x range: from the rotation start to past the deadline, the last hour and the
    /// forecast, but a forecast far beyond the deadline is shown as an arrow at the edge
    /// rather than squeezing the data into a corner.
    fn x_range(&self) -> (i64, i64) {
        let first = self.points.first().map_or(self.started_ms, |p| p.hour_ms);
        let from = self.started_ms.min(first);
        let last = self.points.last().map_or(from, |p| p.hour_ms + HOUR_MS);
        let mut to = self.deadline_ms.max(last);
        if let Some(f) = self.forecast_ms {
            let cap = to + (to - from) / 2;
            to = to.max(f.min(cap));
        }
        let pad = ((to - from) / 30).max(HOUR_MS);
        (from, to + pad)
    }

    /// The chart as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>, ChartError> {
        if self.points.is_empty() {
            return Err(ChartError::NoData);
        }
        register_font();
        let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
        self.draw(&mut rgb)?;
        let data = serde_json::to_string(self).map_err(|e| ChartError::Encode(e.to_string()))?;
        encode_png(&rgb, &data)
    }

    fn draw(&self, rgb: &mut [u8]) -> Result<(), ChartError> {
        let err = |e: &dyn std::fmt::Display| ChartError::Draw(e.to_string());
        let tz = self.tz();
        let (from, to) = self.x_range();
        let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let font = |size: f64| FontDesc::new(FontFamily::Name(FONT), size, FontStyle::Normal);
        let span = to - from;
        let label_fmt = move |ms: &i64| -> String {
            let Some(t) = tz.timestamp_millis_opt(*ms).single() else {
                return String::new();
            };
            if span <= 3 * DAY_MS {
                t.format("%d %b %H:%M").to_string()
            } else {
                t.format("%d %b").to_string()
            }
        };
        // The marks' labels go in the top margin, above the plot, where no line crosses them.
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_top(44)
            .x_label_area_size(28)
            .y_label_area_size(44)
            .build_cartesian_2d(from..to, 0f64..1.0)
            .map_err(|e| err(&e))?;
        let grey = RGBColor(0x99, 0x99, 0x99);
        chart
            .configure_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .axis_style(grey)
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&label_fmt)
            .y_label_formatter(&|v| format!("{:.0} %", v * 100.0))
            .label_style(font(12.0).color(&RGBColor(0x55, 0x55, 0x55)))
            .draw()
            .map_err(|e| err(&e))?;

        let blue = RGBColor(0x1f, 0x6f, 0xd1);
        // The share, hour by hour (centred in its hour); a gap of more than two hours
        // without traffic breaks the line rather than drawing a slope nobody measured.
        let mut runs: Vec<Vec<(i64, f64)>> = Vec::new();
        let mut prev: Option<i64> = None;
        for p in &self.points {
            if prev.is_none_or(|h| p.hour_ms - h > 2 * HOUR_MS) {
                runs.push(Vec::new());
            }
            runs.last_mut()
                .expect("a run was pushed")
                .push((p.hour_ms + HOUR_MS / 2, p.share));
            prev = Some(p.hour_ms);
        }
        for run in &runs {
            chart
                .draw_series(AreaSeries::new(run.iter().copied(), 0.0, blue.mix(0.15)))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(LineSeries::new(run.iter().copied(), blue.stroke_width(2)))
                .map_err(|e| err(&e))?;
        }

        // The forecast: the fitted line from the last hour to 100 %.
        let green = RGBColor(0x2e, 0x8b, 0x57);
        if let (Some(done), Some(slope)) = (self.forecast_ms, self.slope_per_day) {
            let last = self.points.last().expect("not empty").hour_ms + HOUR_MS / 2;
            let at = |t: i64| (1.0 - slope * (done - t) as f64 / DAY_MS as f64).clamp(0.0, 1.0);
            let end = done.min(to);
            if end > last {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(last, at(last)), (end, at(end))],
                        6,
                        4,
                        green.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?;
            }
            let text = if done > to {
                format!("forecast {} →", label_fmt(&done))
            } else {
                format!("forecast {}", label_fmt(&done))
            };
            chart
                .draw_series([Circle::new((end, at(end)), 4, green.filled())])
                .map_err(|e| err(&e))?;
            let (px, _) = chart.backend_coord(&(end, 1.0));
            let anchor_right = px > (WIDTH as i32) - 160;
            let pos = if anchor_right {
                Pos::new(HPos::Right, VPos::Top)
            } else {
                Pos::new(HPos::Left, VPos::Top)
            };
            root.draw(&Text::new(
                text,
                (if anchor_right { px - 6 } else { px + 6 }, 26),
                font(12.0).color(&green).pos(pos),
            ))
            .map_err(|e| err(&e))?;
        } else if self.stalled {
            root.draw(&Text::new(
                "forecast: stalled",
                (60, 26),
                font(12.0).color(&RGBColor(0xb0, 0x30, 0x30)),
            ))
            .map_err(|e| err(&e))?;
        }

        // The deadline: a red line across the whole height.
        let red = RGBColor(0xc6, 0x28, 0x28);
        chart
            .draw_series(DashedLineSeries::new(
                [(self.deadline_ms, 0.0), (self.deadline_ms, 1.0)],
                5,
                3,
                red.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        let (dx, _) = chart.backend_coord(&(self.deadline_ms, 1.0));
        let anchor_right = dx > (WIDTH as i32) - 140;
        let (x, pos) = if anchor_right {
            (dx - 6, Pos::new(HPos::Right, VPos::Top))
        } else {
            (dx + 6, Pos::new(HPos::Left, VPos::Top))
        };
        root.draw(&Text::new(
            format!("deadline {}", label_fmt(&self.deadline_ms)),
            (x, 8),
            font(12.0).color(&red).pos(pos),
        ))
        .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// The adoption chart of a rotation as PNG bytes (for the email, the CLI, Telegram).
pub fn adoption_png(status: &RotationStatus) -> Result<Vec<u8>, ChartError> {
    AdoptionChart::from_status(status).to_png()
}

/// The share as a sparkline of at most `width` characters (`▁` 0 % … `█` 100 %), each the
/// request-weighted share of its slice of hours; `·` for a slice without traffic. Empty
/// when there is no data or the rotation is scheduled.
pub fn sparkline(status: &RotationStatus, width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let pts = &status.share;
    if pts.is_empty() || width == 0 || status.phase == Phase::Scheduled {
        return String::new();
    }
    let first = pts[0].hour_ms;
    let hours = ((pts[pts.len() - 1].hour_ms - first) / HOUR_MS + 1) as usize;
    let slots = hours.min(width);
    let mut sums = vec![(0.0f64, 0u64); slots];
    for p in pts {
        let h = ((p.hour_ms - first) / HOUR_MS) as usize;
        let slot = h * slots / hours;
        sums[slot].0 += p.share * p.requests as f64;
        sums[slot].1 += p.requests;
    }
    sums.iter()
        .map(|(s, n)| {
            if *n == 0 {
                '·'
            } else {
                let share = (s / *n as f64).clamp(0.0, 1.0);
                BARS[((share * 7.0).round() as usize).min(7)]
            }
        })
        .collect()
}

fn register_font() {
    REGISTER.call_once(|| {
        // The font is part of the binary and tested below: failing here is a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("the embedded chart font does not parse"));
    });
}

fn encode_png(rgb: &[u8], data: &str) -> Result<Vec<u8>, ChartError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    enc.add_text_chunk(DATA_CHUNK.to_owned(), data.to_owned())
        .map_err(|e| ChartError::Encode(e.to_string()))?;
    let mut w = enc
        .write_header()
        .map_err(|e| ChartError::Encode(e.to_string()))?;
    w.write_image_data(rgb)
        .map_err(|e| ChartError::Encode(e.to_string()))?;
    w.finish().map_err(|e| ChartError::Encode(e.to_string()))?;
    Ok(out)
}

/// The data a PNG drawn by [`AdoptionChart::to_png`] carries, as JSON.
pub fn png_data(png_bytes: &[u8]) -> Option<serde_json::Value> {
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = dec.read_info().ok()?;
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == DATA_CHUNK)?;
    serde_json::from_str(&text.text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Forecast, SharePoint};

    fn status(hours: i64, forecast: Option<i64>) -> RotationStatus {
        let start = 1_794_301_200_000; // 2026-11-10T09:00:00Z
        RotationStatus {
            old_key: "key-a".into(),
            old_name: None,
            new_key: "key-b".into(),
            new_name: None,
            owner: "acme".into(),
            timezone: "Europe/Berlin".into(),
            started_ms: start,
            deadline_ms: start + 14 * DAY_MS,
            phase: Phase::OnTrack,
            share_24h: Some(0.5),
            share: (0..hours)
                .filter(|h| h % 24 != 3)
                .map(|h| SharePoint {
                    hour_ms: start + h * HOUR_MS,
                    share: (h as f64 / hours as f64).min(1.0),
                    requests: 40,
                })
                .collect(),
            old_requests: 100,
            new_requests: 100,
            last_old_use_ms: None,
            safe_to_revoke_ms: start + 20 * DAY_MS,
            forecast: Forecast {
                completion_ms: forecast,
                slope_per_day: forecast.map(|_| 0.1),
                basis_hours: 24,
                basis_requests: 960,
                stalled: forecast.is_none(),
            },
            lingering: Vec::new(),
            old_key_sources: Vec::new(),
        }
    }

    #[test]
    fn the_png_has_its_size_and_carries_the_data_it_draws() {
        let s = status(200, Some(1_794_301_200_000 + 12 * DAY_MS));
        let png_bytes = adoption_png(&s).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(&png_bytes));
        let r = dec.read_info().unwrap();
        assert_eq!((r.info().width, r.info().height), (WIDTH, HEIGHT));
        let data = png_data(&png_bytes).unwrap();
        assert_eq!(
            data,
            serde_json::to_value(AdoptionChart::from_status(&s)).unwrap()
        );
        assert_eq!(data["points"].as_array().unwrap().len(), s.share.len());
        // Text is drawn (the embedded font works): pixels in the deadline's red exist.
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let mut r = r;
        r.next_frame(&mut buf).unwrap();
        let reds = buf
            .chunks(3)
            .filter(|p| p[0] > 0xb0 && p[1] < 0x60 && p[2] < 0x60)
            .count();
        assert!(reds > 200, "{reds} red pixels");
    }

    #[test]
    fn far_stalled_and_empty_rotations_draw_or_say_why_not() {
        // Forecast a year after the deadline; stalled; one hour of data.
        for s in [
            status(100, Some(1_794_301_200_000 + 400 * DAY_MS)),
            status(100, None),
            status(1, None),
        ] {
            assert!(adoption_png(&s).unwrap().len() > 1000);
        }
        assert!(matches!(
            adoption_png(&status(0, None)),
            Err(ChartError::NoData)
        ));
    }

    #[test]
    fn sparklines_fit_their_width_and_follow_the_share() {
        let s = status(200, None);
        let line = sparkline(&s, 20);
        assert_eq!(line.chars().count(), 20);
        assert!(line.starts_with('▁') && line.ends_with('█'), "{line}");
        let short = status(5, None);
        assert_eq!(sparkline(&short, 20).chars().count(), 5);
        assert_eq!(sparkline(&status(0, None), 20), "");
    }
}
