//! Images in requests: `data:image/(jpeg|png|webp);base64,...` URLs decoded and
//! verified here (size cap, magic bytes matching the declared type, dimensions read
//! from the header), `https://` URLs the host fetches (contract 0.3: through its
//! destination guard and limits, checked to be an image), or paths into the host's inputs
//! volume passed on untouched.
//!
//! No image crate: only headers are read. This module never opens files or sockets: a path
//! is handed to the host as [`ImageSource::InputPath`], a URL as [`ImageSource::File`].

use base64::Engine as _;

use crate::decode::field_error;
use crate::{FieldError, ImageSource, Upload};

/// The default cap on a decoded image (10 MiB).
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// The largest width or height accepted.
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// Image formats accepted in data URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type.to_ascii_lowercase().as_str() {
            "image/png" => Some(ImageFormat::Png),
            "image/jpeg" | "image/jpg" => Some(ImageFormat::Jpeg),
            "image/webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }
}

/// An image decoded from a data URL and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: Vec<u8>,
}

/// An image request field: decoded bytes or a path in the inputs volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageInput {
    Decoded(DecodedImage),
    InputPath(String),
    /// An `http(s)://` URL the host fetches (its guard decides what may be fetched).
    Url(String),
}

impl ImageInput {
    /// The upload the host performs before submitting: the image from `field`
    /// goes into `workflow[node_id].inputs[input_name]`. The file is named
    /// `{stem}.{ext}` (ext from the decoded format, or kept from the path).
    pub fn into_upload(self, field: &str, stem: &str, node_id: &str, input_name: &str) -> Upload {
        let (filename, source) = match self {
            ImageInput::Decoded(image) => (
                format!("{stem}.{}", image.format.extension()),
                ImageSource::Bytes(image.bytes),
            ),
            ImageInput::Url(url) => {
                let path = url.split(['?', '#']).next().unwrap_or_default();
                (format!("{stem}.{}", extension_of(path)), crate::references::image_source(&crate::references::FileReference { url: Some(url), asset: None, sha256: None, blake3: None }))
            }
            ImageInput::InputPath(path) => {
                let ext = path
                    .rsplit('/')
                    .next()
                    .and_then(|name| name.rsplit_once('.'))
                    .map(|(_, ext)| ext.to_ascii_lowercase())
                    .filter(|ext| {
                        !ext.is_empty()
                            && ext.len() <= 5
                            && ext.chars().all(|c| c.is_ascii_alphanumeric())
                    })
                    .unwrap_or_else(|| "png".to_string());
                (format!("{stem}.{ext}"), ImageSource::InputPath(path))
            }
        };
        Upload {
            field: field.to_string(),
            filename,
            source,
            node_id: node_id.to_string(),
            input_name: input_name.to_string(),
        }
    }
}

/// The extension of the last segment of `path` when it is a short alphanumeric one, else `png`.
fn extension_of(path: &str) -> String {
    path.rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .filter(|ext| !ext.is_empty() && ext.len() <= 5 && ext.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "png".to_string())
}

/// Interpret an image field: a `data:` URL is decoded and verified (at most
/// `max_bytes` decoded); an `https://` (or `http://`) URL is left to the host to fetch;
/// anything else must be a relative path inside the inputs volume (no `..`, no leading
/// `/`, no `\`, no control characters, no other URL scheme).
pub fn parse_image_input(
    field: &str,
    value: &str,
    max_bytes: usize,
) -> Result<ImageInput, FieldError> {
    // `get`, not `[..5]`: the fifth byte may fall inside a character (`日本語`).
    if value.get(..5).is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:")) {
        return decode_data_url(field, value, max_bytes).map(ImageInput::Decoded);
    }
    let lower = value.get(..8).unwrap_or_default().to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        if value.chars().count() > crate::references::MAX_REFERENCE_CHARS || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(field_error(field, format!("must be a URL of at most {} characters without spaces", crate::references::MAX_REFERENCE_CHARS)));
        }
        return Ok(ImageInput::Url(value.to_string()));
    }
    check_input_path(field, value).map(|()| ImageInput::InputPath(value.to_string()))
}

fn check_input_path(field: &str, path: &str) -> Result<(), FieldError> {
    let problem = if path.trim().is_empty() {
        Some(
            "must be a data:image/...;base64 URL or a path in the inputs volume, got an empty string",
        )
    } else if path.contains("://") {
        Some(
            "only https URLs are fetched; send an https URL, a data:image/(jpeg|png|webp);base64,... URL or a path in the inputs volume",
        )
    } else if path.starts_with('/') || path.contains('\\') {
        Some("must be a path relative to the inputs volume, using `/` (e.g. `faces/alice.png`)")
    } else if path
        .split('/')
        .any(|segment| segment == ".." || segment == "." || segment.is_empty())
    {
        Some("must not contain `..`, `.` or empty path segments")
    } else if path.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match problem {
        Some(message) => Err(field_error(field, message)),
        None => Ok(()),
    }
}

/// Decode a `data:image/(jpeg|png|webp);base64,...` URL; verify the size, that the
/// bytes are the declared format, and read the dimensions from the header.
pub fn decode_data_url(
    field: &str,
    url: &str,
    max_bytes: usize,
) -> Result<DecodedImage, FieldError> {
    let fail = |message: String| field_error(field, message);
    let rest = url
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("data:"))
        .and_then(|_| url.get(5..))
        .ok_or_else(|| fail("must be a data: URL".into()))?;
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| fail("malformed data URL: no `,` before the data".into()))?;
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or_default().trim();
    let declared = ImageFormat::from_media_type(media_type).ok_or_else(|| {
        fail(format!(
            "unsupported image type {media_type:?}; send image/jpeg, image/png or image/webp"
        ))
    })?;
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(fail(
            "the data URL must be base64-encoded (`data:image/png;base64,...`)".into(),
        ));
    }
    // Line-wrapped base64 is accepted; copy only when there is whitespace to drop.
    let payload: std::borrow::Cow<'_, [u8]> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect::<Vec<u8>>()
            .into()
    } else {
        payload.as_bytes().into()
    };
    let estimated = payload.len() / 4 * 3;
    if estimated > max_bytes.saturating_add(3) {
        return Err(fail(too_large(estimated, max_bytes)));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(&payload)
        .map_err(|e| fail(format!("the base64 data is invalid: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(fail(too_large(bytes.len(), max_bytes)));
    }
    let (format, width, height) = sniff_image(&bytes).ok_or_else(|| {
        fail(format!(
            "the data is not a readable {} image (bad or truncated header)",
            declared.media_type()
        ))
    })?;
    if format != declared {
        return Err(fail(format!(
            "the data URL says {} but the bytes are {}",
            declared.media_type(),
            format.media_type()
        )));
    }
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(fail(format!(
            "image is {width}x{height}; width and height must be between 1 and {MAX_IMAGE_SIDE}"
        )));
    }
    Ok(DecodedImage {
        format,
        width,
        height,
        bytes,
    })
}

fn too_large(size: usize, max: usize) -> String {
    format!(
        "the image is too large ({size} bytes); the limit is {max} bytes ({} MiB)",
        max / (1024 * 1024)
    )
}

/// Recognise PNG, JPEG or WEBP by magic bytes and read `(format, width, height)`
/// from the header. `None` when the bytes are none of these or the header is cut.
pub fn sniff_image(bytes: &[u8]) -> Option<(ImageFormat, u32, u32)> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return png_size(bytes).map(|(w, h)| (ImageFormat::Png, w, h));
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return jpeg_size(bytes).map(|(w, h)| (ImageFormat::Jpeg, w, h));
    }
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return webp_size(bytes).map(|(w, h)| (ImageFormat::Webp, w, h));
    }
    None
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

/// IHDR is the first chunk: length(4) "IHDR" width(4) height(4).
fn png_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.get(12..16)? != b"IHDR" {
        return None;
    }
    Some((be_u32(b, 16)?, be_u32(b, 20)?))
}

/// Walk the marker segments up to the first start-of-frame.
fn jpeg_size(b: &[u8]) -> Option<(u32, u32)> {
    let mut at = 2;
    loop {
        // Markers start with 0xFF, possibly padded with more 0xFF.
        if *b.get(at)? != 0xFF {
            return None;
        }
        while *b.get(at)? == 0xFF {
            at += 1;
        }
        let marker = *b.get(at)?;
        at += 1;
        match marker {
            // Standalone markers: TEM, RSTn, SOI.
            0x01 | 0xD0..=0xD8 => continue,
            // End of image or start of scan before any frame header.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        let length = usize::from(be_u16(b, at)?);
        if length < 2 {
            return None;
        }
        let is_start_of_frame =
            matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_start_of_frame {
            // length(2) precision(1) height(2) width(2)
            let height = be_u16(b, at + 3)?;
            let width = be_u16(b, at + 5)?;
            return Some((u32::from(width), u32::from(height)));
        }
        at += length;
    }
}

/// The first chunk after `RIFF....WEBP` tells the flavour: lossy `VP8 `,
/// lossless `VP8L`, or extended `VP8X` (canvas size).
fn webp_size(b: &[u8]) -> Option<(u32, u32)> {
    match b.get(12..16)? {
        b"VP8 " => {
            // chunk data at 20: frame tag(3) then start code 9d 01 2a, then 14-bit sizes.
            if b.get(23..26)? != [0x9d, 0x01, 0x2a] {
                return None;
            }
            Some((
                u32::from(le_u16(b, 26)? & 0x3fff),
                u32::from(le_u16(b, 28)? & 0x3fff),
            ))
        }
        b"VP8L" => {
            if *b.get(20)? != 0x2f {
                return None;
            }
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        b"VP8X" => Some((le_u24(b, 24)? + 1, le_u24(b, 27)? + 1)),
        _ => None,
    }
}

/// Test images built byte by byte (headers only, enough for [`sniff_image`]).
#[doc(hidden)]
pub mod samples {
    /// A PNG signature + IHDR chunk of the given size.
    pub fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
        b.extend_from_slice(&13u32.to_be_bytes());
        b.extend_from_slice(b"IHDR");
        b.extend_from_slice(&width.to_be_bytes());
        b.extend_from_slice(&height.to_be_bytes());
        b.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    /// SOI, an APP0 segment, then a baseline SOF0 of the given size.
    pub fn jpeg_header(width: u16, height: u16) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        b.extend_from_slice(b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00");
        b.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        b.extend_from_slice(&height.to_be_bytes());
        b.extend_from_slice(&width.to_be_bytes());
        b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        b
    }

    /// A lossy (`VP8 `) WEBP header of the given size.
    pub fn webp_header(width: u16, height: u16) -> Vec<u8> {
        let mut b = b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00".to_vec();
        b.extend_from_slice(&[0x30, 0x01, 0x00, 0x9d, 0x01, 0x2a]);
        b.extend_from_slice(&width.to_le_bytes());
        b.extend_from_slice(&height.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b
    }

    /// `data:{media_type};base64,{bytes}`.
    pub fn data_url(media_type: &str, bytes: &[u8]) -> String {
        use base64::Engine as _;
        format!(
            "data:{media_type};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    #[test]
    fn non_ascii_image_field_is_a_field_error_not_a_panic() {
        for value in ["日本語", "dat日", "ab\u{e9}cd", "日本語.png/../x"] {
            match parse_image_input("reference_image", value, 1 << 20) {
                Ok(ImageInput::InputPath(p)) => assert_eq!(p, value),
                Ok(other) => panic!("{value}: {other:?}"),
                Err(e) => assert_eq!(e.field, "reference_image"),
            }
        }
        assert!(decode_data_url("f", "日本語", 1 << 20).is_err());
    }

    #[test]
    fn sniffs_png_jpeg_and_webp_dimensions() {
        assert_eq!(
            sniff_image(&png_header(640, 480)),
            Some((ImageFormat::Png, 640, 480))
        );
        assert_eq!(
            sniff_image(&jpeg_header(800, 600)),
            Some((ImageFormat::Jpeg, 800, 600))
        );
        assert_eq!(
            sniff_image(&webp_header(320, 200)),
            Some((ImageFormat::Webp, 320, 200))
        );
    }

    #[test]
    fn sniffs_lossless_and_extended_webp() {
        let mut lossless = b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f".to_vec();
        let bits: u32 = (100 - 1) | ((50 - 1) << 14);
        lossless.extend_from_slice(&bits.to_le_bytes());
        assert_eq!(sniff_image(&lossless), Some((ImageFormat::Webp, 100, 50)));
        let mut extended = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x10\x00\x00\x00".to_vec();
        extended.extend_from_slice(&[0xFF, 0x0F, 0x00, 0x37, 0x00, 0x00]);
        assert_eq!(sniff_image(&extended), Some((ImageFormat::Webp, 4096, 56)));
    }

    #[test]
    fn reads_a_real_png_file() {
        let png = include_bytes!("../../comfyui-double/fixtures/stretch-tiny-flux-output.png");
        assert_eq!(sniff_image(png), Some((ImageFormat::Png, 64, 64)));
    }

    #[test]
    fn truncated_or_foreign_bytes_are_not_images() {
        assert_eq!(sniff_image(&png_header(1, 1)[..18]), None);
        assert_eq!(sniff_image(&jpeg_header(1, 1)[..12]), None);
        assert_eq!(sniff_image(b"GIF89a\x01\x00\x01\x00"), None);
        assert_eq!(sniff_image(b""), None);
    }

    #[test]
    fn a_data_url_decodes_with_its_dimensions() {
        let url = data_url("image/png", &png_header(512, 768));
        let image = decode_data_url("reference_image", &url, DEFAULT_MAX_IMAGE_BYTES).unwrap();
        assert_eq!(
            (image.format, image.width, image.height),
            (ImageFormat::Png, 512, 768)
        );
        let url = data_url("image/jpeg", &jpeg_header(64, 32));
        assert_eq!(
            decode_data_url("f", &url, DEFAULT_MAX_IMAGE_BYTES)
                .unwrap()
                .width,
            64
        );
        let url = data_url("image/webp", &webp_header(64, 32));
        assert_eq!(
            decode_data_url("f", &url, DEFAULT_MAX_IMAGE_BYTES)
                .unwrap()
                .height,
            32
        );
    }

    #[test]
    fn base64_with_line_breaks_and_without_padding_is_accepted() {
        let url = data_url("image/png", &png_header(8, 8));
        let wrapped = format!("{}\n{}", &url[..40], url[40..].trim_end_matches('='));
        assert!(decode_data_url("f", &wrapped, DEFAULT_MAX_IMAGE_BYTES).is_ok());
    }

    fn message(result: Result<DecodedImage, FieldError>) -> String {
        let error = result.unwrap_err();
        assert_eq!(error.field, "reference_image");
        error.message
    }

    #[test]
    fn every_data_url_problem_names_the_field() {
        let d = |url: &str| decode_data_url("reference_image", url, DEFAULT_MAX_IMAGE_BYTES);
        assert!(message(d("data:image/gif;base64,R0lGOD")).contains("unsupported image type"));
        assert!(message(d("data:image/png,rawdata")).contains("base64"));
        assert!(message(d("data:image/png;base64")).contains("no `,`"));
        assert!(message(d("data:image/png;base64,!!!!")).contains("base64 data is invalid"));
        assert!(
            message(d(&data_url("image/png", b"not an image at all")))
                .contains("not a readable image/png")
        );
        assert!(
            message(d(&data_url("image/png", &jpeg_header(8, 8))))
                .contains("says image/png but the bytes are image/jpeg")
        );
        assert!(message(d(&data_url("image/png", &png_header(0, 8)))).contains("between 1 and"));
        assert!(message(d(&data_url("image/png", &png_header(8193, 8)))).contains("between 1 and"));
    }

    #[test]
    fn the_size_cap_is_obeyed_and_violated() {
        let mut big = png_header(8, 8);
        big.resize(1000, 0);
        let url = data_url("image/png", &big);
        assert!(decode_data_url("reference_image", &url, 1000).is_ok());
        assert!(message(decode_data_url("reference_image", &url, 999)).contains("too large"));
        // Far too large: refused before decoding.
        assert!(message(decode_data_url("reference_image", &url, 10)).contains("too large"));
    }

    #[test]
    fn paths_are_passed_to_the_host_and_traversal_is_refused() {
        assert_eq!(
            parse_image_input("reference_image", "faces/alice.png", 10),
            Ok(ImageInput::InputPath("faces/alice.png".into()))
        );
        for bad in [
            "",
            "/etc/passwd",
            "../secret.png",
            "faces/../../x.png",
            "a//b.png",
            "a\\b.png",
            "ftp://example.com/a.png",
            "https://example.com/a b.png",
            "a\u{0}.png",
            "./a.png",
        ] {
            let error = parse_image_input("reference_image", bad, 10).unwrap_err();
            assert_eq!(error.field, "reference_image", "{bad:?}");
        }
    }

    #[test]
    fn an_https_url_is_an_upload_the_host_fetches() {
        let input = parse_image_input("reference_image", "https://example.com/faces/alice.JPG?x=1", 10).unwrap();
        assert_eq!(input, ImageInput::Url("https://example.com/faces/alice.JPG?x=1".into()));
        let upload = input.into_upload("reference_image", "reference", "7", "image");
        assert_eq!(upload.filename, "reference.jpg");
        assert!(matches!(upload.source, ImageSource::File(ref f) if f.source == crate::FileSource::Url("https://example.com/faces/alice.JPG?x=1".into())));
    }

    #[test]
    fn uploads_carry_field_node_and_a_filename_with_the_right_extension() {
        let decoded = parse_image_input(
            "reference_image",
            &data_url("image/jpeg", &jpeg_header(4, 4)),
            1 << 20,
        )
        .unwrap();
        let upload = decoded.into_upload("reference_image", "reference", "7", "image");
        assert_eq!(upload.filename, "reference.jpg");
        assert_eq!(
            (
                upload.field.as_str(),
                upload.node_id.as_str(),
                upload.input_name.as_str()
            ),
            ("reference_image", "7", "image")
        );
        assert!(matches!(upload.source, ImageSource::Bytes(ref b) if b.starts_with(&[0xFF, 0xD8])));
        let path = ImageInput::InputPath("faces/Alice.WEBP".into()).into_upload(
            "reference_image",
            "reference",
            "7",
            "image",
        );
        assert_eq!(path.filename, "reference.webp");
        assert!(matches!(path.source, ImageSource::InputPath(ref p) if p == "faces/Alice.WEBP"));
    }
}
