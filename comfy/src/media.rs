//! Media type sniffing for output bytes: the true type comes from the magic bytes, never from a
//! file name or a header ComfyUI (or a custom node) may have got wrong. Pure functions only.
//! This is the one sniffer: the host (`flowhost::media`) re-exports it, so the type the client
//! reports and the type the host answers with can never disagree.

/// An image as raw 8-bit pixels (`FlowhostImageOutput`'s frames): `height` rows of `width`
/// pixels of `channels` samples (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), no padding. Not a file
/// format: the host encodes it (JPEG or PNG) before anyone sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Raster {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub pixels: bytes::Bytes,
}

/// The media type [`crate::OutputMedia`] reports for a [`Raster`] (its bytes are the pixels).
pub const RASTER_MEDIA_TYPE: &str = "application/x-flowhost-raster";

/// The media type of `bytes` by magic number: PNG (APNG when an `acTL` chunk comes before the
/// first `IDAT`), JPEG, WEBP, GIF, MP4, QuickTime (`ftyp` brand `qt  `), WEBM; else
/// `application/octet-stream`.
pub fn sniff_media_type(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        if is_animated_png(bytes) { "image/apng" } else { "image/png" }
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        "image/gif"
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        if &bytes[8..10] == b"qt" {
            "video/quicktime"
        } else {
            "video/mp4"
        }
    } else if bytes.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        "video/webm"
    } else {
        "application/octet-stream"
    }
}

/// Whether a PNG carries an animation control chunk (`acTL`) before its image data.
fn is_animated_png(bytes: &[u8]) -> bool {
    let mut at = 8;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        match &header[4..8] {
            b"acTL" => return true,
            b"IDAT" | b"IEND" => return false,
            _ => {}
        }
        // length + type + data + crc; a corrupt length ends the walk.
        let Some(next) = at.checked_add(12).and_then(|n| n.checked_add(len)) else { return false };
        at = next;
    }
    false
}

/// A file extension for a sniffed media type (used to name websocket outputs).
pub fn extension_for(media_type: &str) -> &'static str {
    match media_type {
        "image/png" | "image/apng" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "video/mp4" => "mp4",
        "video/quicktime" => "mov",
        "video/webm" => "webm",
        _ => "bin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_each_supported_type() {
        assert_eq!(sniff_media_type(b"\x89PNG\r\n\x1a\nrest"), "image/png");
        assert_eq!(sniff_media_type(&[0xFF, 0xD8, 0xFF, 0xE0]), "image/jpeg");
        assert_eq!(sniff_media_type(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(sniff_media_type(b"GIF89a...."), "image/gif");
        assert_eq!(sniff_media_type(b"\0\0\0\x18ftypisom\0\0"), "video/mp4");
        assert_eq!(sniff_media_type(b"hello"), "application/octet-stream");
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    }

    #[test]
    fn quicktime_mp4_webp_png_gif_and_apng_each_get_their_own_type() {
        assert_eq!(sniff_media_type(b"\0\0\0\x14ftypqt  \0\0\0\0qt  "), "video/quicktime");
        assert_eq!(sniff_media_type(b"\0\0\0\x18ftypmp42\0\0\0\0"), "video/mp4");
        assert_eq!(sniff_media_type(b"RIFF\x24\0\0\0WEBPVP8X"), "image/webp");
        assert_eq!(sniff_media_type(b"GIF87a...."), "image/gif");
        let mut still = b"\x89PNG\r\n\x1a\n".to_vec();
        still.extend(chunk(b"IHDR", &[0; 13]));
        let mut animated = still.clone();
        still.extend(chunk(b"IDAT", &[1, 2, 3]));
        animated.extend(chunk(b"acTL", &[0, 0, 0, 2, 0, 0, 0, 0]));
        animated.extend(chunk(b"IDAT", &[1, 2, 3]));
        assert_eq!(sniff_media_type(&still), "image/png");
        assert_eq!(sniff_media_type(&animated), "image/apng");
        // An acTL after the image data is not an animation header; a corrupt length ends the walk.
        let mut late = still.clone();
        late.extend(chunk(b"acTL", &[0; 8]));
        assert_eq!(sniff_media_type(&late), "image/png");
        let mut corrupt = b"\x89PNG\r\n\x1a\n".to_vec();
        corrupt.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, b'x', b'x', b'x', b'x']);
        assert_eq!(sniff_media_type(&corrupt), "image/png");
    }
}
