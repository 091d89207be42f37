//! The safetensors header: strict parsing and validation, errors naming the tensor.

use super::*;

/// A header's tensors (in header order) and `__metadata__`.
pub(super) type Header = (Vec<(String, TensorInfo)>, BTreeMap<String, String>);

/// Parses and validates a safetensors header: a JSON object without duplicate keys (serde's maps
/// would keep the last silently), each tensor's data a whole number of bytes matching its shape
/// and dtype, and the tensors' data contiguous from byte 0 without gaps or overlaps. Errors name
/// the tensor.
pub(super) fn parse_header(header: &[u8]) -> std::result::Result<Header, String> {
    let HeaderJson { tensors, metadata } = serde_json::from_slice(header).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("unknown variant") {
            format!("unknown dtype in header: {msg}")
        } else {
            format!("invalid header: {msg}")
        }
    })?;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        (tensors[a].1.data_offsets, &tensors[a].0).cmp(&(tensors[b].1.data_offsets, &tensors[b].0))
    });
    let mut end = 0usize;
    let mut prev: Option<&str> = None;
    for &i in &order {
        let (name, info) = &tensors[i];
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: data_offsets [{s}, {e}] end before they start"
            ));
        }
        if s < end {
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: its data [{s}, {e}] overlaps that of `{}`, which ends at byte {end}",
                prev.unwrap_or("")
            ));
        }
        if s > end {
            let after = prev.map_or("the start of the data".to_string(), |p| format!("`{p}`"));
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: its data starts at byte {s}, leaving a gap of {} bytes after {after}",
                s - end
            ));
        }
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else {
            return Err(format!(
                "invalid header: tensor `{name}`: shape {:?} of {} overflows",
                info.shape, info.dtype
            ));
        };
        if bits % 8 != 0 {
            return Err(format!(
                "invalid header: tensor `{name}`: shape {:?} of {} is not a whole number of bytes",
                info.shape, info.dtype
            ));
        }
        if e - s != bits / 8 {
            return Err(format!(
                "invalid header: tensor `{name}` has shape {:?} of {} ({} bytes) but data_offsets [{s}, {e}] hold {} bytes",
                info.shape,
                info.dtype,
                bits / 8,
                e - s
            ));
        }
        end = e;
        prev = Some(name);
    }
    Ok((tensors, metadata))
}

/// The header's JSON, read in one pass that refuses duplicate keys.
pub(super) struct HeaderJson {
    tensors: Vec<(String, TensorInfo)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> serde::Deserialize<'de> for HeaderJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderJson, A::Error> {
                use serde::de::Error as _;
                let mut seen = std::collections::HashSet::new();
                let mut tensors = Vec::new();
                let mut metadata = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format!(
                            "duplicate key `{key}` (a header names each tensor once)"
                        )));
                    }
                    if key == "__metadata__" {
                        metadata = map.next_value::<Option<StringMap>>()?.unwrap_or_default().0;
                    } else {
                        // Through a `Value`, so that the error names the tensor once, with the
                        // position of the whole entry.
                        let v: serde_json::Value = map.next_value()?;
                        let info: TensorInfo = serde_json::from_value(v)
                            .map_err(|e| A::Error::custom(format!("tensor `{key}`: {e}")))?;
                        tensors.push((key, info));
                    }
                }
                Ok(HeaderJson { tensors, metadata })
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object of strings without duplicate keys (`__metadata__`).
#[derive(Default)]
pub(super) struct StringMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for StringMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StringMap, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if out.insert(key.clone(), value).is_some() {
                        return Err(A::Error::custom(format!(
                            "duplicate key `{key}` in __metadata__"
                        )));
                    }
                }
                Ok(StringMap(out))
            }
        }
        d.deserialize_map(V)
    }
}
