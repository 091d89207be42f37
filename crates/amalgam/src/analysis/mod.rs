//! Seeing a pool of models before merging it: distances and cosines per key, block and
//! component ([`compare()`]), a 2-D map of the models, the outliers flagged, and the report
//! written as JSON, CSV, charts and one HTML page ([`write_report`]).

mod charts;
mod compare;
mod html;
mod mds;
mod outliers;
mod report;
mod stats;

pub use charts::{write_charts, ChartFile};
pub use compare::{
    compare, CompareOptions, Comparison, KeyStats, ModelMap, NamedStats, PoolModel, Skipped,
};
pub use html::write_html;
pub use mds::classical_mds;
pub use outliers::{median, Outlier, OutlierRule};
pub use report::{summary_table, write_report};
pub use stats::{GroupStats, ModelStats};
