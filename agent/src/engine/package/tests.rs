use super::*;
use serde_json::json;

fn bytes_tensor(name: &str, items: &[&[u8]]) -> Tensor {
    Tensor {
        name: name.into(),
        shape: vec![items.len()],
        data: TensorData::Bytes(items.iter().map(|b| b.to_vec()).collect()),
    }
}

fn decl(v: Value) -> Processing {
    serde_json::from_value(v).expect("declaration parses")
}

fn no_files(name: &str) -> Result<Vec<u8>, String> {
    Err(format!("no file '{name}'"))
}

const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"Lowercase"},
 "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
 "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2,"again":3},"unk_token":"[UNK]"}}"#;

/// A PNG whose header declares `w × h` pixels and whose only pixel data is 16 bytes that are
/// not even compressed data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    idat.extend([0x55; 16]);
    png.extend(16u32.to_be_bytes());
    png.extend(&idat);
    png.extend(crc32(&idat).to_be_bytes());
    png
}

fn grey_png(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let img = ::image::GrayImage::from_fn(w, h, |x, y| ::image::Luma([f(x, y)]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ::image::ImageFormat::Png).expect("png encodes");
    out.into_inner()
}

#[test]
fn steps_are_declared_strictly() {
    let bad =
        json!({ "pre": [{ "kind": "tabular", "input": "x", "output": "X", "fields": [], "colour": 1 }], "golden": {} });
    assert!(serde_json::from_value::<Processing>(bad).is_err(), "an unknown setting is refused");
    let bad = json!({ "post": [{ "kind": "softmax", "output": "y", "axis": 2 }], "golden": {} });
    assert!(serde_json::from_value::<Processing>(bad).is_err());
    let bad = json!({ "pre": [{ "kind": "audio", "input": "x" }], "golden": {} });
    assert!(serde_json::from_value::<Processing>(bad).is_err());
}

#[test]
fn text_becomes_padded_token_ids_and_mask() {
    let d = decl(json!({ "pre": [{ "kind": "text", "input": "text", "tokenizer": "tok.json", "max_length": 3,
        "attention_mask": "attention_mask", "token_type_ids": "token_type_ids" }], "golden": {} }));
    let p = Package::build(&d, &|n| if n == "tok.json" { Ok(TOKENIZER.as_bytes().to_vec()) } else { no_files(n) })
        .expect("builds");
    let out = p.pre(vec![bytes_tensor("text", &[b"Hello", b"hello world again zzz"])]).expect("runs");
    assert_eq!(out[0].name, "input_ids");
    assert_eq!(out[0].shape, vec![2, 3], "padded to the longest, truncated at max_length");
    assert_eq!(out[0].data, TensorData::I64(vec![1, 0, 0, 1, 2, 3]));
    assert_eq!(out[1].data, TensorData::I64(vec![1, 0, 0, 1, 1, 1]));
    assert_eq!(out[2].name, "token_type_ids");
    let err = p.pre(vec![bytes_tensor("text", &[b"\xff\xfe"])]).unwrap_err();
    assert!(err.contains("not UTF-8"), "{err}");
    let err =
        p.pre(vec![Tensor { name: "text".into(), shape: vec![1], data: TensorData::F32(vec![1.0]) }]).unwrap_err();
    assert!(err.contains("BYTES"), "{err}");
    let err = Package::build(&d, &|_| Ok(b"{not a tokenizer".to_vec())).unwrap_err();
    assert!(err.contains("tok.json"), "{err}");
}

#[test]
fn fields_map_from_json_or_csv_with_scaling() {
    let d = decl(json!({ "pre": [{ "kind": "tabular", "input": "row", "output": "X", "fields": [
        { "name": "a" }, { "name": "b", "mean": 10.0, "std": 2.0 }, { "name": "c", "default": 7.0 } ] }], "golden": {} }));
    let p = Package::build(&d, &no_files).expect("builds");
    let out = p.pre(vec![bytes_tensor("row", &[br#"{"b": 14, "a": 1.5}"#, b"2, 8, 3"])]).expect("runs");
    assert_eq!(out[0].shape, vec![2, 3]);
    assert_eq!(out[0].data, TensorData::F32(vec![1.5, 2.0, 7.0, 2.0, -1.0, 3.0]));
    for (row, want) in [
        (&br#"{"a": 1}"#[..], "field 'b' is missing"),
        (br#"{"a": 1, "b": 2, "d": 3}"#, "unknown field 'd'"),
        (br#"{"a": "x", "b": 2}"#, "not a number"),
        (b"1,2", "2 values"),
        (br#"{"a": 1e999, "b": 1}"#, "not a JSON object"),
    ] {
        let err = p.pre(vec![bytes_tensor("row", &[row])]).unwrap_err();
        assert!(err.contains(want), "{err} (wanted {want})");
    }
}

#[test]
fn an_image_is_decoded_scaled_and_laid_out() {
    let d = decl(json!({ "pre": [{ "kind": "image", "input": "png", "output": "pixels", "width": 2, "height": 2,
        "channels": 1, "scale": 0.5, "mean": [1.0], "std": [2.0] }], "golden": {} }));
    let p = Package::build(&d, &no_files).expect("builds");
    let png = grey_png(2, 2, |x, y| (10 * (y * 2 + x)) as u8);
    let out = p.pre(vec![bytes_tensor("png", &[&png])]).expect("decodes");
    assert_eq!(out[0].shape, vec![1, 1, 2, 2]);
    assert_eq!(out[0].data, TensorData::F32(vec![-0.5, 2.0, 4.5, 7.0]));
    // A larger image is resized to the declared size.
    let out = p.pre(vec![bytes_tensor("png", &[&grey_png(8, 8, |_, _| 4)])]).expect("resizes");
    assert_eq!(out[0].data, TensorData::F32(vec![0.5; 4]));
    let err = p.pre(vec![bytes_tensor("png", &[b"GIF89a...."])]).unwrap_err();
    assert!(err.contains("not accepted"), "{err}");
    let err = p.pre(vec![bytes_tensor("png", &[b"plain words"])]).unwrap_err();
    assert!(err.contains("not a PNG or JPEG"), "{err}");
}

#[test]
fn an_oversized_image_is_refused_from_its_header_before_decoding() {
    let d = decl(json!({ "pre": [{ "kind": "image", "input": "png", "output": "pixels", "width": 8, "height": 8,
        "channels": 1, "max_pixels": 1000000 }], "golden": {} }));
    let p = Package::build(&d, &no_files).expect("builds");
    // 60000 × 60000 declared, no pixel data at all: only the header can have been read.
    let err = p.pre(vec![bytes_tensor("png", &[&png_header(60000, 60000)])]).unwrap_err();
    assert!(err.contains("refused before decoding"), "{err}");
    let err = p.pre(vec![bytes_tensor("png", &[&png_header(1001, 1000)])]).unwrap_err();
    assert!(err.contains("refused before decoding"), "{err}");
    // Within the bound, the same truncated file fails in the decoder, not the size check.
    let err = p.pre(vec![bytes_tensor("png", &[&png_header(100, 100)])]).unwrap_err();
    assert!(!err.contains("refused before decoding"), "{err}");
}

#[test]
fn post_steps_give_probabilities_labels_and_decisions() {
    let d = decl(json!({ "post": [
        { "kind": "softmax", "output": "logits" },
        { "kind": "top_k", "output": "logits", "k": 2, "labels": "labels.txt", "labels_output": "label", "scores_output": "score" },
        { "kind": "threshold", "output": "logits", "threshold": 0.5, "as": "sure" } ],
        "outputs": ["label", "score", "sure"], "golden": {} }));
    let p = Package::build(&d, &|n| if n == "labels.txt" { Ok(b"cat\ndog\nbird\n".to_vec()) } else { no_files(n) })
        .expect("builds");
    let logits = Tensor { name: "logits".into(), shape: vec![1, 3], data: TensorData::F32(vec![0.0, 2.0, 0.0]) };
    let out = p.post(vec![logits]).expect("runs");
    assert_eq!(out.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["label", "score", "sure"]);
    assert_eq!(out[0].data, TensorData::Bytes(vec![b"dog".to_vec(), b"cat".to_vec()]));
    let TensorData::F32(s) = &out[1].data else { panic!("scores are FP32") };
    assert!((s[0] - 0.786_986).abs() < 1e-5 && (s[1] - 0.106_507).abs() < 1e-5, "{s:?}");
    assert_eq!(out[2].data, TensorData::Bool(vec![false, true, false]));
    assert_eq!(p.output_names(&["logits".into()]), ["label", "score", "sure"]);
    let err = Package::build(&d, &|_| Ok(Vec::new())).unwrap_err();
    assert!(err.contains("labels"), "{err}");
}

#[test]
fn a_registry_package_names_every_file_it_reads() {
    let mut d =
        decl(json!({ "pre": [{ "kind": "text", "input": "t", "tokenizer": "tokenizer.json", "max_length": 8 }],
        "golden": {} }));
    assert!(check_files(&d).unwrap_err().contains("tokenizer.json"));
    d.files.insert("tokenizer.json".into(), FileRef { sha256: "a".repeat(64), size: 10 });
    assert!(check_files(&d).is_ok());
    d.files.insert("../x".into(), FileRef { sha256: "a".repeat(64), size: 10 });
    assert!(check_files(&d).is_err());
}

#[test]
fn golden_inputs_may_carry_base64_bytes() {
    let g = parse_golden(&json!({ "tolerance": { "atol": 0.0 }, "cases": [{
        "inputs": [{ "name": "png", "datatype": "BYTES", "shape": [1], "data": ["AAEC"], "encoding": "base64" }],
        "outputs": [{ "name": "y", "datatype": "FP32", "shape": [1], "data": [1.0] }] }] }))
    .expect("parses");
    assert_eq!(g.cases[0].inputs[0].data, TensorData::Bytes(vec![vec![0, 1, 2]]));
    assert!(parse_golden(&json!({ "tolerance": { "atol": 0.0 }, "cases": [] })).is_err());
}

#[test]
fn a_class_beyond_the_labels_file_is_named_by_its_index() {
    let d = decl(json!({ "post": [{ "kind": "top_k", "output": "y", "k": 1, "labels": "l", "labels_output": "label",
        "scores_output": "score" }], "golden": {} }));
    let p = Package::build(&d, &|_| Ok(b"a\nb\n".to_vec())).expect("builds");
    let y = Tensor { name: "y".into(), shape: vec![1, 4], data: TensorData::F32(vec![0.1, 0.2, 0.3, 0.9]) };
    let out = p.post(vec![y]).expect("no failure for an unnamed class");
    assert_eq!(out.iter().find(|t| t.name == "label").map(|t| &t.data), Some(&TensorData::Bytes(vec![b"3".to_vec()])));
}

#[test]
fn the_pixels_of_one_request_are_bounded_over_all_its_images() {
    let d = decl(json!({ "pre": [{ "kind": "image", "input": "png", "output": "pixels", "width": 8, "height": 8,
        "channels": 1, "max_pixels": 16777216 }], "golden": {} }));
    let p = Package::build(&d, &no_files).expect("builds");
    // Five black images of 16 Mpx each (a few kilobytes each): four decode, the fifth would
    // pass the 64 Mpx a request may hold.
    let big = grey_png(4096, 4096, |_, _| 0);
    assert!(p.pre(vec![bytes_tensor("png", &[&big, &big, &big, &big])]).is_ok());
    let err = p.pre(vec![bytes_tensor("png", &[&big, &big, &big, &big, &big])]).unwrap_err();
    assert!(err.contains("item 4") && err.contains("in all: refused before decoding"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Hostile bytes (noise, and a real PNG and JPEG with bytes changed) never panic a step:
    /// each is an answer or an error.
    #[test]
    fn raw_steps_never_panic_on_hostile_bytes(
        noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
        flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8),
    ) {
        let d = decl(json!({ "pre": [
            { "kind": "image", "input": "img", "output": "pixels", "width": 4, "height": 4, "channels": 3 },
            { "kind": "tabular", "input": "row", "output": "X", "fields": [{ "name": "a" }, { "name": "b", "default": 0.0 }] },
            { "kind": "text", "input": "text", "tokenizer": "tok.json", "max_length": 16 } ], "golden": {} }));
        let p = Package::build(&d, &|_| Ok(TOKENIZER.as_bytes().to_vec())).expect("builds");
        let png = grey_png(16, 16, |x, y| (x * y) as u8);
        let mut jpeg = std::io::Cursor::new(Vec::new());
        ::image::RgbImage::from_fn(16, 16, |x, y| ::image::Rgb([x as u8, y as u8, 7]))
            .write_to(&mut jpeg, ::image::ImageFormat::Jpeg)
            .expect("jpeg encodes");
        for mut img in [png, jpeg.into_inner()] {
            for &(at, b) in &flips {
                let n = img.len();
                img[at % n] = b;
            }
            let _ = p.pre(vec![bytes_tensor("img", &[&img])]);
        }
        for input in ["img", "row", "text"] {
            let _ = p.pre(vec![bytes_tensor(input, &[&noise])]);
        }
    }
}

#[test]
fn the_tensors_one_request_fills_are_bounded_before_any_work() {
    // 1024 images of 1024×1024×3 would be 12 GiB of FP32: refused before a byte is decoded.
    let d = decl(json!({ "pre": [{ "kind": "image", "input": "img", "output": "pixels", "width": 1024, "height": 1024,
        "channels": 3 }], "golden": {} }));
    let p = Package::build(&d, &no_files).expect("builds");
    let junk: Vec<&[u8]> = vec![b"x"; 1024];
    let err = p.pre(vec![bytes_tensor("img", &junk)]).unwrap_err();
    assert!(err.contains("more than one request takes") && err.contains("at most 5"), "{err}");
    // 1024 texts padded to 8192 tokens: 8M positions, over the 4M a request may fill.
    let d = decl(json!({ "pre": [{ "kind": "text", "input": "text", "tokenizer": "tok.json", "max_length": 8192,
        "padding": "max_length" }], "golden": {} }));
    let p = Package::build(&d, &|_| Ok(TOKENIZER.as_bytes().to_vec())).expect("builds");
    let texts: Vec<&[u8]> = vec![b"hello"; 1024];
    let err = p.pre(vec![bytes_tensor("text", &texts)]).unwrap_err();
    assert!(err.contains("at most 512"), "{err}");
    assert!(p.pre(vec![bytes_tensor("text", &texts[..512])]).is_ok());
}
