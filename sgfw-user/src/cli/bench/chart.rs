//! SVG charts for the benchmark report (plotters, no system fonts needed).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::cli::Failure;

const COLORS: [RGBColor; 6] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];

fn err(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(anyhow!("drawing a chart: {e}"))
}

/// One line per series over categorical x positions.
pub fn lines(
    path: &Path,
    title: &str,
    xs: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<(), Failure> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let n = xs.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(n as f64 - 0.5).max(0.5), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - i as f64).abs() < 0.01 {
                xs.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ns per packet")
        .draw()
        .map_err(err)?;
    for (k, (name, v)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(i, y)| (i as f64, *y)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Bar chart of ratios (1.0 = baseline), one labelled bar per entry.
pub fn bars(
    path: &Path,
    title: &str,
    labels: &[String],
    values: &[f64],
    whiskers: Option<&[(f64, f64)]>,
) -> Result<(), Failure> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = values
        .iter()
        .copied()
        .chain(whiskers.into_iter().flatten().map(|w| w.1))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let n = labels.len().max(1) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n).into_segmented(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n as usize)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("ratio to baseline")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let i = i as u32;
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                BLUE.mix(0.6).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(err)?;
    // The spread of each bar (q1–q3), a vertical line through it.
    if let Some(w) = whiskers {
        for (i, (lo, hi)) in w.iter().enumerate() {
            if !(lo.is_finite() && hi.is_finite()) {
                continue;
            }
            let i = i as u32;
            let mid = SegmentValue::CenterOf(i);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(mid.clone(), *lo), (mid, *hi)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err)?;
        }
    }
    chart
        .draw_series(LineSeries::new(
            vec![(SegmentValue::Exact(0), 1.0), (SegmentValue::Exact(n), 1.0)],
            RED.stroke_width(1),
        ))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
