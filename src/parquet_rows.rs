//! Reads a parquet file's rows as JSON objects (the MMLU-Pro release ships as parquet).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

/// Every row of `path`, each as a JSON object keyed by column name.
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: cannot read rows: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{}: row {}: {e}", path.display(), i + 1))?;
        out.push(row.to_json_value());
    }
    Ok(out)
}
