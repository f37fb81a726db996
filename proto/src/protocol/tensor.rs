//! Tensors as the Open Inference Protocol sees them: a name, a V2 datatype, a shape and flat
//! row-major data. Independent of the engine so parsers build and fuzz without tract.

use std::fmt;

/// The V2 datatypes (`BOOL`, `UINT8` … `FP64`, `BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(s: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Size of one element in the binary tensor encoding; `None` for BYTES (length-prefixed).
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flat row-major tensor contents. FP16 values travel as `f32` and are narrowed by the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f32>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::U8(_) => DataType::U8,
            TensorData::U16(_) => DataType::U16,
            TensorData::U32(_) => DataType::U32,
            TensorData::U64(_) => DataType::U64,
            TensorData::I8(_) => DataType::I8,
            TensorData::I16(_) => DataType::I16,
            TensorData::I32(_) => DataType::I32,
            TensorData::I64(_) => DataType::I64,
            TensorData::F16(_) => DataType::F16,
            TensorData::F32(_) => DataType::F32,
            TensorData::F64(_) => DataType::F64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::U16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::F16(v) | TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of the first NaN or infinite element of a float tensor.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            TensorData::F16(v) | TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
            _ => None,
        }
    }

    /// The first element of an integer tensor outside `lo..hi`, with its position.
    pub fn first_outside(&self, lo: i64, hi: i64) -> Option<(usize, i128)> {
        fn find<T: Copy + Into<i128>>(v: &[T], lo: i64, hi: i64) -> Option<(usize, i128)> {
            v.iter().map(|&x| x.into()).enumerate().find(|&(_, x)| x < i128::from(lo) || x >= i128::from(hi))
        }
        match self {
            TensorData::U8(v) => find(v, lo, hi),
            TensorData::U16(v) => find(v, lo, hi),
            TensorData::U32(v) => find(v, lo, hi),
            TensorData::U64(v) => find(v, lo, hi),
            TensorData::I8(v) => find(v, lo, hi),
            TensorData::I16(v) => find(v, lo, hi),
            TensorData::I32(v) => find(v, lo, hi),
            TensorData::I64(v) => find(v, lo, hi),
            _ => None,
        }
    }

    /// Every element as f64, for tolerance comparisons; `None` for BYTES.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match self {
            TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            TensorData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F16(v) | TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::Bytes(_) => return None,
        })
    }
}

impl TensorData {
    /// Appends `other`'s elements (row-major data: appending is concatenation along the first
    /// axis). Fails, leaving `self` as it was, when the element types differ.
    pub fn append(&mut self, other: TensorData) -> Result<(), String> {
        macro_rules! pairs {
            ($($var:ident),*) => {
                match (self, other) {
                    $((TensorData::$var(a), TensorData::$var(mut b)) => {
                        a.append(&mut b);
                        Ok(())
                    })*
                    (a, b) => Err(format!("cannot append {} to {}", b.datatype(), a.datatype())),
                }
            };
        }
        pairs!(Bool, U8, U16, U32, U64, I8, I16, I32, I64, F16, F32, F64, Bytes)
    }

    /// Splits off the elements from `at` on (`self` keeps the first `at`), as `Vec::split_off`;
    /// `at` beyond the end is clamped.
    pub fn split_off(&mut self, at: usize) -> TensorData {
        macro_rules! split {
            ($($var:ident),*) => {
                match self {
                    $(TensorData::$var(v) => {
                        let at = at.min(v.len());
                        TensorData::$var(v.split_off(at))
                    })*
                }
            };
        }
        split!(Bool, U8, U16, U32, U64, I8, I16, I32, I64, F16, F32, F64, Bytes)
    }
}

impl TensorData {
    /// The raw little-endian bytes (Triton's binary tensor layout; BYTES elements are each
    /// prefixed with a 4-byte little-endian length).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn put<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(v.len() * N);
            for &x in v {
                out.extend_from_slice(&f(x));
            }
            out
        }
        match self {
            TensorData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::U16(v) => put(v, u16::to_le_bytes),
            TensorData::U32(v) => put(v, u32::to_le_bytes),
            TensorData::U64(v) => put(v, u64::to_le_bytes),
            TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
            TensorData::I16(v) => put(v, i16::to_le_bytes),
            TensorData::I32(v) => put(v, i32::to_le_bytes),
            TensorData::I64(v) => put(v, i64::to_le_bytes),
            TensorData::F16(v) => put(v, |x: f32| f16_bits(x).to_le_bytes()),
            TensorData::F32(v) => put(v, f32::to_le_bytes),
            TensorData::F64(v) => put(v, f64::to_le_bytes),
            TensorData::Bytes(v) => {
                let mut out = Vec::new();
                for b in v {
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
                out
            }
        }
    }
}

impl TensorData {
    /// Decodes `n` elements of `dt` from Triton's binary tensor layout (little-endian; BOOL one
    /// byte, 0 or 1; BYTES each prefixed with a 4-byte little-endian length). The bytes must be
    /// exactly the tensor: no more, no less.
    pub fn from_le_bytes(dt: DataType, bytes: &[u8], n: usize) -> Result<TensorData, String> {
        if let Some(size) = dt.element_size() {
            let want = n.checked_mul(size).ok_or("element count overflows")?;
            if bytes.len() != want {
                return Err(format!("{} bytes of binary data, {n} {dt} elements need {want}", bytes.len()));
            }
        }
        fn get<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
        }
        Ok(match dt {
            DataType::Bool => TensorData::Bool(
                bytes
                    .iter()
                    .map(|&b| match b {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(format!("BOOL byte {b} is neither 0 nor 1")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            DataType::U8 => TensorData::U8(bytes.to_vec()),
            DataType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            DataType::U16 => TensorData::U16(get(bytes, u16::from_le_bytes)),
            DataType::I16 => TensorData::I16(get(bytes, i16::from_le_bytes)),
            DataType::U32 => TensorData::U32(get(bytes, u32::from_le_bytes)),
            DataType::I32 => TensorData::I32(get(bytes, i32::from_le_bytes)),
            DataType::U64 => TensorData::U64(get(bytes, u64::from_le_bytes)),
            DataType::I64 => TensorData::I64(get(bytes, i64::from_le_bytes)),
            DataType::F16 => TensorData::F16(get(bytes, |b| f16_to_f32(u16::from_le_bytes(b)))),
            DataType::F32 => TensorData::F32(get(bytes, f32::from_le_bytes)),
            DataType::F64 => TensorData::F64(get(bytes, f64::from_le_bytes)),
            DataType::Bytes => {
                let mut out = Vec::with_capacity(n.min(bytes.len() / 4 + 1));
                let mut rest = bytes;
                while !rest.is_empty() {
                    let (len, tail) = rest.split_first_chunk::<4>().ok_or("a BYTES length prefix is cut short")?;
                    let len = u32::from_le_bytes(*len) as usize;
                    if len > tail.len() {
                        return Err(format!("a BYTES element of {len} bytes runs past the data"));
                    }
                    out.push(tail[..len].to_vec());
                    rest = &tail[len..];
                    if out.len() > n {
                        break;
                    }
                }
                if out.len() != n {
                    return Err(format!("binary data holds {} or more BYTES elements, the shape needs {n}", out.len()));
                }
                TensorData::Bytes(out)
            }
        })
    }
}

/// The f32 value of IEEE 754 half-precision bits (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m × 2^-24, exact in f32.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            sign | v.to_bits()
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// IEEE 754 half-precision bits of an f32 (round to nearest even).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let round = u32::from(rem > mid || (rem == mid && (half & 1) == 1));
        return sign | (half + round) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let round = u32::from(rem > 0x1000 || (rem == 0x1000 && (half & 1) == 1));
    sign | (half + round) as u16
}

/// A named tensor of a request or a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }

    /// Number of elements the shape holds, `None` on overflow.
    pub fn shape_elements(shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn f16_round_trips_every_finite_half() {
        for h in 0u16..=u16::MAX {
            let x = super::f16_to_f32(h);
            if x.is_nan() {
                continue;
            }
            assert_eq!(super::f16_bits(x), h, "{h:#06x} -> {x}");
        }
    }
}
