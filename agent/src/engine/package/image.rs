//! Encoded images in, pixels out: PNG or JPEG decoded (its size checked from the header before
//! any pixel is decoded), resized, normalized and laid out as the model takes them.

use std::io::Cursor;

use image::{imageops::FilterType, ImageFormat, ImageReader, Limits};
use outpost_proto::registry::package::ImageStep;

use crate::protocol::{Tensor, TensorData};

/// Largest side of a decoded image, whatever `max_pixels` allows.
const MAX_SIDE: u32 = 16384;
/// Largest model input side.
const MAX_TARGET_SIDE: u32 = 4096;
/// Most pixels decoded for one request, over all its images (at least one image's worth).
const MAX_REQUEST_PIXELS: u64 = 64 << 20;
/// Most values one request's pixel tensor may hold (64 MiB of FP32), at least one image's.
const MAX_REQUEST_VALUES: usize = 16 << 20;

pub(super) struct Image {
    step: ImageStep,
    formats: Vec<ImageFormat>,
    nhwc: bool,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Image {
    pub(super) fn build(step: &ImageStep) -> Result<Image, String> {
        let formats = step
            .formats
            .iter()
            .map(|f| match f.as_str() {
                "png" => Ok(ImageFormat::Png),
                "jpeg" => Ok(ImageFormat::Jpeg),
                other => Err(format!("image step: format '{other}' is not png or jpeg")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if formats.is_empty() {
            return Err("image step: no format accepted".into());
        }
        let nhwc = match step.layout.as_str() {
            "nchw" => false,
            "nhwc" => true,
            other => return Err(format!("image step: layout '{other}' is not nchw or nhwc")),
        };
        if !matches!(step.channels, 1 | 3) {
            return Err("image step: channels must be 1 or 3".into());
        }
        if step.width == 0 || step.height == 0 || step.width > MAX_TARGET_SIDE || step.height > MAX_TARGET_SIDE {
            return Err(format!("image step: width and height must be 1-{MAX_TARGET_SIDE}"));
        }
        let per_channel = |v: &[f32], default: f32, what: &str| -> Result<Vec<f32>, String> {
            match v.len() {
                0 => Ok(vec![default; usize::from(step.channels)]),
                1 => Ok(vec![v[0]; usize::from(step.channels)]),
                n if n == usize::from(step.channels) => Ok(v.to_vec()),
                n => Err(format!("image step: {what} has {n} values for {} channels", step.channels)),
            }
        };
        let mean = per_channel(&step.mean, 0.0, "mean")?;
        let std = per_channel(&step.std, 1.0, "std")?;
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) || !step.scale.is_finite() {
            return Err("image step: std must be non-zero and scale finite".into());
        }
        Ok(Image { step: step.clone(), formats, nhwc, mean, std })
    }

    pub(super) fn output(&self) -> &str {
        &self.step.output
    }

    pub(super) fn input(&self) -> &str {
        &self.step.input
    }

    /// `[n]` encoded images to FP32 `[n, c, h, w]` (or `[n, h, w, c]`).
    pub(super) fn run(&self, t: &Tensor) -> Result<Tensor, String> {
        let images = super::items(t, "encoded images")?;
        let (w, h, c) = (self.step.width as usize, self.step.height as usize, usize::from(self.step.channels));
        // The tensor is bounded before anything is decoded or allocated for it.
        let per_image = w * h * c;
        if images.len() > 1 && images.len() * per_image > MAX_REQUEST_VALUES.max(per_image) {
            return Err(format!(
                "input '{}': {} images of {w}×{h}×{c} values are more than one request takes; send at most {}",
                t.name,
                images.len(),
                (MAX_REQUEST_VALUES / per_image).max(1)
            ));
        }
        let mut out = Vec::with_capacity(images.len() * per_image);
        let mut budget = MAX_REQUEST_PIXELS.max(self.step.max_pixels);
        for (i, bytes) in images.iter().enumerate() {
            let pixels = self.decode(bytes, &mut budget).map_err(|e| format!("input '{}' item {i}: {e}", t.name))?;
            let plane = w * h;
            let base = out.len();
            out.resize(base + plane * c, 0.0);
            for (p, px) in pixels.chunks_exact(c).enumerate() {
                for (ch, &v) in px.iter().enumerate() {
                    let x = (f32::from(v) * self.step.scale - self.mean[ch]) / self.std[ch];
                    let at = if self.nhwc { p * c + ch } else { ch * plane + p };
                    out[base + at] = x;
                }
            }
        }
        let shape = if self.nhwc { vec![images.len(), h, w, c] } else { vec![images.len(), c, h, w] };
        Ok(Tensor { name: self.step.output.clone(), shape, data: TensorData::F32(out) })
    }

    /// One image's pixels, `height × width × channels` bytes, row-major.
    fn decode(&self, bytes: &[u8], budget: &mut u64) -> Result<Vec<u8>, String> {
        if bytes.len() > self.step.max_bytes {
            return Err(format!("{} bytes of image; at most {}", bytes.len(), self.step.max_bytes));
        }
        let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
        let format = reader.format().ok_or("not a PNG or JPEG image")?;
        if !self.formats.contains(&format) {
            return Err(format!("{format:?} images are not accepted here"));
        }
        // The header alone: the decoded size is known before any pixel is decoded.
        let (iw, ih) = reader.into_dimensions().map_err(|e| format!("unreadable {format:?} header: {e}"))?;
        if iw == 0 || ih == 0 || iw > MAX_SIDE || ih > MAX_SIDE || u64::from(iw) * u64::from(ih) > self.step.max_pixels
        {
            return Err(format!(
                "a {iw}×{ih} image is larger than this model takes ({} pixels at most): refused before decoding",
                self.step.max_pixels
            ));
        }
        let pixels = u64::from(iw) * u64::from(ih);
        if pixels > *budget {
            return Err(format!(
                "the request's images hold more than {} pixels in all: refused before decoding",
                MAX_REQUEST_PIXELS.max(self.step.max_pixels)
            ));
        }
        *budget -= pixels;
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = Limits::default();
        limits.max_image_width = Some(iw);
        limits.max_image_height = Some(ih);
        // Room for the largest pixel layout (16-bit RGBA) of the size the header declared.
        limits.max_alloc = Some(u64::from(iw) * u64::from(ih) * 8 + (1 << 20));
        reader.limits(limits);
        let img = reader.decode().map_err(|e| format!("cannot decode the {format:?} image: {e}"))?;
        let (w, h) = (self.step.width, self.step.height);
        Ok(if self.step.channels == 1 {
            let g = img.to_luma8();
            let g = if g.dimensions() == (w, h) { g } else { image::imageops::resize(&g, w, h, FilterType::Triangle) };
            g.into_raw()
        } else {
            let rgb = img.to_rgb8();
            let rgb = if rgb.dimensions() == (w, h) {
                rgb
            } else {
                image::imageops::resize(&rgb, w, h, FilterType::Triangle)
            };
            rgb.into_raw()
        })
    }
}
