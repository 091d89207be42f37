//! Where a `.mecha` recipe's model files are: its model lines name paths written on the machine
//! that made it, so they are renamed (`--rename`) and looked for in `--model-dir` folders.

use std::path::{Path, PathBuf};

/// The file model line path `p` names: renamed by the first matching `(old, new)` (a whole path
/// or a file name), then looked for, a relative path in each of `model_dirs` then in `dir` (the
/// recipe's folder), an absolute one as it is then by file name in `model_dirs`. When none exists:
/// the path as renamed, the candidates tried, and the last candidate (for the error).
pub(super) fn find(
    p: &str,
    renames: &[(String, String)],
    model_dirs: &[PathBuf],
    dir: &Path,
) -> std::result::Result<PathBuf, (String, String, PathBuf)> {
    let renamed = renames.iter().find_map(|(old, new)| {
        let name = Path::new(p).file_name()?.to_str()?;
        (p == old || name == old).then(|| {
            if p == old {
                new.clone()
            } else {
                p[..p.len() - name.len()].to_string() + new
            }
        })
    });
    let p = renamed.as_deref().unwrap_or(p);
    let path = Path::new(p);
    let candidates: Vec<PathBuf> = if path.is_absolute() {
        std::iter::once(path.to_path_buf())
            .chain(
                model_dirs
                    .iter()
                    .filter_map(|d| path.file_name().map(|f| d.join(f))),
            )
            .collect()
    } else {
        model_dirs
            .iter()
            .map(|d| d.join(path))
            .chain(std::iter::once(dir.join(path)))
            .collect()
    };
    match candidates.iter().find(|c| c.is_file()) {
        Some(f) => Ok(f.clone()),
        None => Err((
            p.to_string(),
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            candidates.last().cloned().unwrap_or_default(),
        )),
    }
}
