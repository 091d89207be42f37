//! `report.html`: one self-contained page of a [`Comparison`] (no network, no other file): a
//! header, the outliers with the rule used, the tables per model and per block (sortable by a
//! click on a column header), the charts inline as SVG, and the notes and keys left out.

use super::charts::{fmt_num, ChartFile};
use super::compare::Comparison;
use super::stats::{GroupStats, ModelStats};
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The charts shown open; the others (per component) are folded, one fold per component.
const MAIN_CHARTS: [&str; 5] = [
    "bars_total",
    "blocks",
    "heatmap_l2",
    "heatmap_cos",
    "map_all",
];

/// Lists longer than this are folded.
const FOLD_OVER: usize = 10;

const STYLE: &str = r#"
body{font-family:"DejaVu Sans",Verdana,Arial,sans-serif;font-size:14px;color:#222;margin:20px 28px;}
h1{font-size:22px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px}
table{border-collapse:collapse;font-size:12.5px}
td,th{padding:2px 8px;border-bottom:1px solid #eee;white-space:nowrap}
th{background:#f4f4f4;text-align:left;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \25B2"}th[data-dir=desc]::after{content:" \25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.outlier td{background:#fde8e8}
.flag{color:#d62728;font-weight:bold}
.meta td:first-child{color:#666}
.scroll{overflow:auto;max-height:80vh;max-width:100%;border:1px solid #eee}
figure{margin:16px 0}
figure svg{max-width:100%;height:auto;display:block}
details{margin:6px 0}summary{cursor:pointer}
.rule{background:#f7f7f7;padding:6px 10px;border-left:3px solid #d62728}
"#;

const SCRIPT: &str = r#"
document.querySelectorAll('table.sortable').forEach(function (t) {
  var heads = t.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.title = 'Click to sort';
    th.addEventListener('click', function () {
      var asc = th.getAttribute('data-dir') !== 'asc';
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', asc ? 'asc' : 'desc');
      var key = function (r) {
        var c = r.cells[col], v = c.getAttribute('data-v');
        if (v === null) return c.textContent.toLowerCase();
        return v === '' ? null : parseFloat(v);
      };
      var body = t.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null) return y === null ? 0 : 1;
        if (y === null) return -1;
        var d = (typeof x === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"#;

/// Writes `dir/report.html` for `c` and its `charts` (as [`super::write_charts`] returned them;
/// their SVG files are read and inlined) and returns its path.
pub fn write_html(c: &Comparison, charts: &[ChartFile], dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut svgs = Vec::with_capacity(charts.len());
    for ch in charts {
        let text = std::fs::read_to_string(&ch.svg).map_err(|e| Error::io(&ch.svg, e))?;
        svgs.push(inline_svg(&text));
    }
    let page = page(c, charts, &svgs);
    let path = dir.join("report.html");
    std::fs::write(&path, page).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// HTML-escapes `s` (for text and attribute values).
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// An SVG file's text as an element of the page: without an XML declaration, and without the
/// namespace declaration HTML does not need.
fn inline_svg(text: &str) -> String {
    let text = text.trim_start();
    let text = match text.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map_or(rest, |(_, r)| r).trim_start(),
        None => text,
    };
    text.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A numeric cell: shown rounded, sorted by its full value (`n/a` sorts last).
fn num_cell(v: f64) -> String {
    if v.is_finite() {
        format!("<td class=\"num\" data-v=\"{v:e}\">{}</td>", fmt_num(v))
    } else {
        "<td class=\"num\" data-v=\"\">n/a</td>".to_string()
    }
}

/// The four figures of a model in a group, as shown (`None`: no base).
fn figures(s: &ModelStats, base: bool) -> Vec<f64> {
    let mut v = Vec::new();
    if base {
        v.push(s.dist_base.unwrap_or(f64::NAN));
        v.push(s.cos_base.unwrap_or(f64::NAN));
    }
    v.push(s.dist_mean);
    v.push(s.cos_mean);
    v
}

fn page(c: &Comparison, charts: &[ChartFile], svgs: &[String]) -> String {
    let mut h = String::new();
    let n = c.models.len();
    let title = format!(
        "amalgam compare: {n} model{}",
        if n == 1 { "" } else { "s" }
    );
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    header(&mut h, c);
    outliers(&mut h, c);
    model_table(&mut h, c);
    block_table(&mut h, c);
    chart_section(&mut h, c, charts, svgs);
    notes(&mut h, c);
    let _ = write!(h, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    h
}

fn header(h: &mut String, c: &Comparison) {
    let mut rows: Vec<(&str, String)> = vec![("models", c.models.len().to_string())];
    rows.push((
        "base",
        match &c.base {
            Some(b) => format!(
                "{} ({})",
                escape(&b.name),
                escape(&b.path.display().to_string())
            ),
            None => "none: distances to the pool mean".to_string(),
        },
    ));
    rows.push((
        "layout",
        escape(c.layout.as_deref().unwrap_or("not recognised")),
    ));
    rows.push((
        "keys compared",
        format!("{} ({} elements per model)", c.total.keys, c.total.elements),
    ));
    rows.push((
        "bytes read",
        format!(
            "{} of {} of tensor data",
            bytes(c.bytes_read),
            bytes(c.input_bytes)
        ),
    ));
    rows.push(("time", format!("{:.2} s", c.seconds)));
    rows.push(("amalgam", escape(&c.version)));
    h.push_str("<table class=\"meta\">\n");
    for (k, v) in rows {
        let _ = writeln!(h, "<tr><td>{k}</td><td>{v}</td></tr>");
    }
    h.push_str("</table>\n");
}

fn outliers(h: &mut String, c: &Comparison) {
    let _ = write!(
        h,
        "<h2 id=\"outliers\">Outliers</h2>\n<p class=\"rule\">Rule: {}</p>\n",
        escape(&c.outlier_rule)
    );
    if c.outliers.is_empty() {
        h.push_str("<p>No model is flagged.</p>\n");
        return;
    }
    h.push_str(
        "<table class=\"sortable\">\n<thead><tr><th>model</th><th>measure</th><th>value</th>\
         <th>threshold</th></tr></thead>\n<tbody>\n",
    );
    for o in &c.outliers {
        let _ = writeln!(
            h,
            "<tr class=\"outlier\"><td><span class=\"flag\">&#9873;</span> {}</td><td>{}</td>{}{}</tr>",
            escape(&o.model),
            escape(&o.measure),
            num_cell(o.value),
            num_cell(o.threshold)
        );
    }
    h.push_str("</tbody>\n</table>\n");
}

/// The groups of the per-model table: the whole model, then each component (when more than one).
fn groups(c: &Comparison) -> Vec<(&str, &GroupStats)> {
    let mut g = vec![("total", &c.total)];
    if c.components.len() > 1 {
        g.extend(c.components.iter().map(|x| (x.name.as_str(), &x.stats)));
    }
    g
}

/// The model's name cell, flagged when an outlier; and the row's class.
fn name_cell(c: &Comparison, i: usize) -> (String, &'static str) {
    let m = &c.models[i];
    let flagged: Vec<&str> = c
        .outliers
        .iter()
        .filter(|o| o.model == m.name)
        .map(|o| o.measure.as_str())
        .collect();
    let path = escape(&m.path.display().to_string());
    if flagged.is_empty() {
        (format!("<td title=\"{path}\">{}</td>", escape(&m.name)), "")
    } else {
        (
            format!(
                "<td title=\"{path}\">{} <span class=\"flag\" title=\"outlier by {}\">&#9873; outlier</span></td>",
                escape(&m.name),
                escape(&flagged.join(", "))
            ),
            " class=\"outlier\"",
        )
    }
}

fn model_table(h: &mut String, c: &Comparison) {
    let base = c.base.is_some();
    let names: &[&str] = if base {
        &["dist_base", "cos_base", "dist_mean", "cos_mean"]
    } else {
        &["dist_mean", "cos_mean"]
    };
    h.push_str(
        "<h2 id=\"models\">Per model</h2>\n<p>L2 distances and cosines per group of keys \
         (dist_base, cos_base: to the base; dist_mean, cos_mean: to the pool mean). Click a \
         column header to sort.</p>\n<div class=\"scroll\"><table class=\"sortable\">\n<thead><tr>\
         <th>#</th><th>model</th>",
    );
    let groups = groups(c);
    for (g, _) in &groups {
        for f in names {
            let _ = write!(h, "<th>{} {f}</th>", escape(g));
        }
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for i in 0..c.models.len() {
        let (name, class) = name_cell(c, i);
        let _ = write!(
            h,
            "<tr{class}><td class=\"num\" data-v=\"{i}\">{}</td>{name}",
            i + 1
        );
        for (_, s) in &groups {
            match s.models.get(i) {
                Some(m) => figures(m, base)
                    .into_iter()
                    .for_each(|v| h.push_str(&num_cell(v))),
                None => (0..names.len()).for_each(|_| h.push_str(&num_cell(f64::NAN))),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table></div>\n");
}

fn block_table(h: &mut String, c: &Comparison) {
    if c.blocks.is_empty() {
        return;
    }
    let what = if c.base.is_some() {
        "the L2 distance to the base (dist_base)"
    } else {
        "the L2 distance to the pool mean (dist_mean)"
    };
    let _ = write!(
        h,
        "<h2 id=\"blocks\">Per block</h2>\n<p>Per block (supermerger's block ids), {what}.</p>\n\
         <div class=\"scroll\"><table class=\"sortable\">\n<thead><tr><th>#</th><th>model</th>"
    );
    for b in &c.blocks {
        let _ = write!(
            h,
            "<th title=\"{} keys, {} elements\">{}</th>",
            b.stats.keys,
            b.stats.elements,
            escape(&b.name)
        );
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for i in 0..c.models.len() {
        let (name, class) = name_cell(c, i);
        let _ = write!(
            h,
            "<tr{class}><td class=\"num\" data-v=\"{i}\">{}</td>{name}",
            i + 1
        );
        for b in &c.blocks {
            let v = b.stats.models.get(i).map_or(f64::NAN, |s| {
                if c.base.is_some() {
                    s.dist_base.unwrap_or(f64::NAN)
                } else {
                    s.dist_mean
                }
            });
            h.push_str(&num_cell(v));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table></div>\n");
}

fn figure(h: &mut String, ch: &ChartFile, svg: &str) {
    let _ = write!(
        h,
        "<figure id=\"chart-{}\" title=\"{}\">\n{svg}\n</figure>\n",
        escape(&ch.name),
        escape(&ch.title)
    );
}

fn chart_section(h: &mut String, c: &Comparison, charts: &[ChartFile], svgs: &[String]) {
    if charts.is_empty() {
        return;
    }
    h.push_str(
        "<h2 id=\"charts\">Charts</h2>\n<p>Outliers are drawn in red. Each chart is also \
         written beside this page as SVG and PNG.</p>\n",
    );
    for (ch, svg) in charts.iter().zip(svgs) {
        if MAIN_CHARTS.contains(&ch.name.as_str()) {
            figure(h, ch, svg);
        }
    }
    let rest: Vec<(&ChartFile, &String)> = charts
        .iter()
        .zip(svgs)
        .filter(|(ch, _)| !MAIN_CHARTS.contains(&ch.name.as_str()))
        .collect();
    if rest.is_empty() {
        return;
    }
    h.push_str("<h3>Per component</h3>\n");
    // One fold per component, in the comparison's order; any other chart in a fold of its own.
    let mut done = vec![false; rest.len()];
    for comp in &c.components {
        let stem = super::charts::file_stem(&comp.name);
        let of: Vec<usize> = (0..rest.len())
            .filter(|&k| !done[k] && rest[k].0.name.split_once('_').map(|x| x.1) == Some(&stem))
            .collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(h, "<details><summary>{}</summary>", escape(&comp.name));
        for k in of {
            figure(h, rest[k].0, rest[k].1);
            done[k] = true;
        }
        h.push_str("</details>\n");
    }
    for (k, (ch, svg)) in rest.iter().enumerate() {
        if !done[k] {
            let _ = writeln!(h, "<details><summary>{}</summary>", escape(&ch.title));
            figure(h, ch, svg);
            h.push_str("</details>\n");
        }
    }
}

fn notes(h: &mut String, c: &Comparison) {
    let open = |count: usize| if count <= FOLD_OVER { " open" } else { "" };
    let _ = write!(
        h,
        "<h2 id=\"notes\">Notes</h2>\n<details{}><summary>{} note{}</summary>\n<ul>\n",
        open(c.notes.len()),
        c.notes.len(),
        if c.notes.len() == 1 { "" } else { "s" }
    );
    for note in &c.notes {
        let _ = writeln!(h, "<li>{}</li>", escape(note));
    }
    h.push_str("</ul>\n</details>\n");
    let _ = write!(
        h,
        "<h2 id=\"skipped\">Keys left out</h2>\n<details{}><summary>{} key{} left out</summary>\n",
        open(c.skipped.len()),
        c.skipped.len(),
        if c.skipped.len() == 1 { "" } else { "s" }
    );
    if !c.skipped.is_empty() {
        h.push_str(
            "<table class=\"sortable\">\n<thead><tr><th>key</th><th>why</th></tr></thead>\n<tbody>\n",
        );
        for s in &c.skipped {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(&s.key),
                escape(&s.why)
            );
        }
        h.push_str("</tbody>\n</table>\n");
    }
    h.push_str("</details>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(escape("a&b<c>\"d'"), "a&amp;b&lt;c&gt;&quot;d&#39;");
        assert_eq!(
            inline_svg("<svg width=\"1\" xmlns=\"http://www.w3.org/2000/svg\">\n</svg>"),
            "<svg width=\"1\">\n</svg>"
        );
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(3 << 20), "3.00 MiB");
    }
}
