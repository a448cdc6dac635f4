//! Is this file a safetensors file? The header read and checked before a downloaded model
//! is placed where ComfyUI can see it: an 8-byte little-endian header length, a JSON object
//! of tensors (`dtype`, `shape`, `data_offsets` inside the data section) and optional
//! `__metadata__` of strings.
//!
//! Owns: that one check. Must never: read more than the header (a LoRA is hundreds of MB),
//! or trust a length from the file before bounding it.

use std::io::Read as _;
use std::path::Path;

/// The longest header accepted (the format's own reference implementation caps it at 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a file is not a safetensors file, in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a safetensors file: {0}")]
pub struct NotSafetensors(pub String);

fn bad(why: impl Into<String>) -> NotSafetensors {
    NotSafetensors(why.into())
}

/// Check the header of the file at `path` (of `size` bytes); returns how many tensors it
/// declares.
pub fn check_file(path: &Path, size: u64) -> Result<usize, NotSafetensors> {
    let mut file = std::fs::File::open(path).map_err(|_| bad("the file could not be read"))?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| bad("it is shorter than the 8-byte header length"))?;
    let header_len = u64::from_le_bytes(prefix);
    if !(2..=MAX_HEADER_BYTES).contains(&header_len) || 8 + header_len > size {
        return Err(bad("the header length does not fit the file"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|_| bad("the header is cut short"))?;
    check_header(&header, size - 8 - header_len)
}

/// Check a header (the JSON text) against a data section of `data_len` bytes.
pub fn check_header(header: &[u8], data_len: u64) -> Result<usize, NotSafetensors> {
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|_| bad("the header is not JSON"))?;
    let serde_json::Value::Object(entries) = value else {
        return Err(bad("the header is not a JSON object"));
    };
    let mut tensors = 0usize;
    for (name, entry) in &entries {
        if name == "__metadata__" {
            let strings = entry.as_object().is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !strings {
                return Err(bad("`__metadata__` must map names to strings"));
            }
            continue;
        }
        let dtype = entry.get("dtype").and_then(serde_json::Value::as_str);
        let shape = entry.get("shape").and_then(serde_json::Value::as_array).is_some_and(|dims| dims.iter().all(|d| d.as_u64().is_some()));
        let offsets = entry.get("data_offsets").and_then(serde_json::Value::as_array).and_then(|o| match o.as_slice() {
            [start, end] => Some((start.as_u64()?, end.as_u64()?)),
            _ => None,
        });
        match (dtype, shape, offsets) {
            (Some(dtype), true, Some((start, end))) if !dtype.is_empty() && start <= end && end <= data_len => tensors += 1,
            (_, _, Some((_, end))) if end > data_len => return Err(bad("a tensor's data lies past the end of the file")),
            _ => return Err(bad("a tensor entry lacks a dtype, shape or data_offsets")),
        }
    }
    if tensors == 0 {
        return Err(bad("it declares no tensors"));
    }
    Ok(tensors)
}

/// A minimal valid safetensors file of exactly `size` bytes (at least 265): one U8 tensor
/// holding `fill`, the header padded with spaces to 256 bytes as the format allows (tests and
/// benches make LoRAs with it).
pub fn synthetic(size: usize, fill: u8) -> Vec<u8> {
    const HEADER: usize = 256;
    let data_len = size.saturating_sub(8 + HEADER).max(1);
    let mut header = format!(r#"{{"__metadata__":{{"format":"pt"}},"lora_unet.weight":{{"dtype":"U8","shape":[{data_len}],"data_offsets":[0,{data_len}]}}}}"#);
    while header.len() < HEADER {
        header.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + data_len);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(8 + header.len() + data_len, fill);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(bytes: &[u8]) -> Result<usize, NotSafetensors> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        check_file(file.path(), bytes.len() as u64)
    }

    #[test]
    fn a_synthetic_lora_passes() {
        assert_eq!(check_bytes(&synthetic(10_000, 3)), Ok(1));
        assert_eq!(synthetic(10_000, 3).len(), 10_000);
    }

    #[test]
    fn a_jpeg_an_empty_file_and_a_lying_header_fail() {
        assert!(check_bytes(&[0xff, 0xd8, 0xff, 0xe0, 0, 0x10, b'J', b'F', b'I', b'F', 0, 1]).is_err());
        assert!(check_bytes(&[]).is_err());
        let mut huge = synthetic(1000, 0);
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(check_bytes(&huge), Err(bad("the header length does not fit the file")));
        let past = br#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4096]}}"#;
        let mut file = (past.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(past);
        file.extend_from_slice(&[0; 16]);
        assert_eq!(check_bytes(&file), Err(bad("a tensor's data lies past the end of the file")));
        assert_eq!(check_header(b"[]", 0), Err(bad("the header is not a JSON object")));
        assert_eq!(check_header(b"{}", 0), Err(bad("it declares no tensors")));
    }
}
