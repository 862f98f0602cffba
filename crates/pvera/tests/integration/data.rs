//! Data loading against what transformers / PIL / torch produce on the same files
//! (`tests/fixtures/data`, written by `tools/make_data_fixtures.py`), plus bad-input errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pvera::data::idx::{parse_idx, IdxDataset, FASHION_MNIST_CLASSES};
use pvera::data::images::{decode_image_file, ImageFolder, ImagePreprocess, RawImage, Resize};
use pvera::data::split::{randperm, train_size_subset, train_val_split, ValSize};
use pvera::data::text::{
    read_csv, CausalLm, CausalLmOptions, Columns, LabelMap, Padding, TextClassification, TextTokenizer,
    TokenizeOptions,
};
use pvera::data::{open_image_classification, Dataset, Subset, Task};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(dir().join("expected.json")).expect("run tools/make_data_fixtures.py");
    serde_json::from_str(&text).unwrap()
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn f32_sha(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    sha_hex(&bytes)
}

fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn rgb_bytes(img: &RawImage) -> Vec<u8> {
    if img.channels == 3 {
        img.data.clone()
    } else {
        img.data.iter().flat_map(|&g| [g, g, g]).collect()
    }
}

fn preprocess_of(e: &Value, name: &str) -> ImagePreprocess {
    ImagePreprocess::from_json(&e["configs"][name], Path::new("expected.json"), None).unwrap()
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn as_i64_rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect()
}

fn err_text<T: std::fmt::Debug>(r: pvera::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// ------------------------------------------------------------------------------------------------
// Images
// ------------------------------------------------------------------------------------------------

#[test]
fn image_folder_lists_classes_and_files_like_torchvision() {
    let f = ImageFolder::open(&dir().join("images"), ImagePreprocess::dinov2(), &Device::Cpu).unwrap();
    assert_eq!(f.classes(), ["bird", "cat", "dog"]);
    let rel: Vec<String> = f
        .paths()
        .iter()
        .map(|p| p.strip_prefix(dir().join("images")).unwrap().to_string_lossy().into_owned())
        .collect();
    // sorted(os.walk(class_dir)) with sorted file names; notes.txt is skipped.
    assert_eq!(
        rel,
        [
            "bird/rgb_17x29.jpg",
            "bird/rgb_24x18.png",
            "cat/grey_20x13.jpg",
            "cat/grey_28x28.png",
            "dog/palette_21x11.png",
            "dog/trns_grey_15x9.png",
            "dog/nested/rgba_16x16.png"
        ]
    );
    assert_eq!(f.class_ids().unwrap(), [0, 0, 1, 1, 2, 2, 2]);
    assert_eq!(f.label_names().unwrap().len(), 3);
    assert_eq!(f.task(), Task::ImageClassification);
}

#[test]
fn preprocessor_configs_parse_to_the_presets() {
    let e = expected();
    assert_eq!(preprocess_of(&e, "dinov2"), ImagePreprocess::dinov2());
    assert_eq!(preprocess_of(&e, "vit"), ImagePreprocess::vit());
}

/// PNG is lossless: decoding and every preprocessing config equal transformers' PIL backend bit
/// for bit.
#[test]
fn png_preprocessing_is_bit_exact_with_transformers_pil_backend() {
    let e = expected();
    let mut checked = 0;
    for (rel, rec) in e["images"].as_object().unwrap() {
        if !rel.ends_with(".png") {
            continue;
        }
        let img = decode_image_file(&dir().join("images").join(rel)).unwrap();
        assert_eq!(sha_hex(&rgb_bytes(&img)), rec["rgb_sha256"].as_str().unwrap(), "{rel}: decoded pixels");
        let mut configs: Vec<(String, &Value)> =
            vec![("dinov2".into(), &rec["dinov2"]), ("vit".into(), &rec["vit"])];
        for (name, r) in rec["small"].as_object().unwrap() {
            configs.push((name.clone(), r));
        }
        for (name, r) in configs {
            let p = preprocess_of(&e, &name);
            let (v, (h, w)) = p.apply(&img).unwrap();
            let shape: Vec<usize> = r["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(vec![3, h, w], shape, "{rel} {name}");
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            assert_eq!(
                f32_sha(&v),
                r["sha256"].as_str().unwrap(),
                "{rel} {name}: sum {sum} vs {}, head {:?} vs {}",
                r["sum"],
                &v[..3],
                r["head"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 5 * 11, "checked {checked}");
}

/// JPEG: zune-jpeg vs libjpeg-turbo (PIL) may differ slightly; preprocessing PIL's own decoded
/// pixels is still exact.
#[test]
fn jpeg_decoding_is_close_to_pil_and_preprocessing_exact() {
    let e = expected();
    for (rel, rec) in e["images"].as_object().unwrap() {
        if !rel.ends_with(".jpg") {
            continue;
        }
        let ours = decode_image_file(&dir().join("images").join(rel)).unwrap();
        let pil = b64(rec["rgb_base64"].as_str().unwrap());
        let mine = rgb_bytes(&ours);
        assert_eq!(mine.len(), pil.len(), "{rel}");
        let max = mine.iter().zip(&pil).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        assert!(max <= 2, "{rel}: JPEG decode differs from PIL by up to {max} grey levels");

        let (w, h) = (rec["width"].as_u64().unwrap() as usize, rec["height"].as_u64().unwrap() as usize);
        let pil_img = RawImage::new(w, h, 3, pil).unwrap();
        for name in ["dinov2", "vit"] {
            let (v, _) = preprocess_of(&e, name).apply(&pil_img).unwrap();
            assert_eq!(f32_sha(&v), rec[name]["sha256"].as_str().unwrap(), "{rel} {name}");
        }
    }
}

#[test]
fn image_batches_hold_pixel_values_and_labels_on_the_device() {
    let e = expected();
    let device = Device::Cpu;
    let f = ImageFolder::open(&dir().join("images"), ImagePreprocess::dinov2(), &device).unwrap().with_threads(2);
    let b = f.get_batch(&[1, 3, 6, 1]).unwrap();
    assert_eq!(b.len(), 4);
    let px = b.inputs.pixel_values.as_ref().unwrap();
    assert_eq!(px.dims(), [4, 3, 224, 224]);
    assert_eq!(px.dtype(), DType::F32);
    assert!(b.inputs.input_ids.is_none());
    assert_eq!(b.labels.dtype(), DType::U32);
    assert_eq!(b.labels.to_vec1::<u32>().unwrap(), [0, 1, 2, 0]);
    for (row, rel) in [(0, "bird/rgb_24x18.png"), (1, "cat/grey_28x28.png"), (2, "dog/nested/rgba_16x16.png")] {
        let v: Vec<f32> = px.get(row).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(f32_sha(&v), e["images"][rel]["dinov2"]["sha256"].as_str().unwrap(), "{rel}");
    }
    // Grey images become three identical channels.
    let grey = px.get(1).unwrap();
    let diff = (grey.get(0).unwrap() - grey.get(2).unwrap()).unwrap();
    let diff = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // Channels differ only by their mean/std; undo them to compare the underlying pixel.
    assert!(diff > 0.0);
    let unnorm = |c: usize, m: f32, s: f32| (grey.get(c).unwrap() * s as f64).unwrap() + m as f64;
    let a = unnorm(0, 0.485, 0.229).unwrap();
    let c = unnorm(2, 0.406, 0.225).unwrap();
    let d = (a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-5, "grey channels differ by {d}");
}

#[test]
fn model_dirs_choose_their_preprocessing() {
    let t = tempfile::tempdir().unwrap();
    let write = |name: &str, files: &[(&str, &str)]| {
        let d = t.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, c) in files {
            std::fs::write(d.join(f), c).unwrap();
        }
        d
    };
    let dino = write("dino", &[("config.json", r#"{"model_type": "dinov2"}"#)]);
    assert_eq!(ImagePreprocess::for_model_dir(&dino).unwrap(), ImagePreprocess::dinov2());
    let vit = write("vit", &[("config.json", r#"{"model_type": "vit"}"#)]);
    assert_eq!(ImagePreprocess::for_model_dir(&vit).unwrap(), ImagePreprocess::vit());
    // facebook/dinov2-small's preprocessor_config.json.
    let hub = write(
        "hub",
        &[
            ("config.json", r#"{"model_type": "dinov2"}"#),
            (
                "preprocessor_config.json",
                r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
                   "do_normalize": true, "do_rescale": true, "do_resize": true,
                   "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
                   "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
                   "size": {"shortest_edge": 256}}"#,
            ),
        ],
    );
    assert_eq!(ImagePreprocess::for_model_dir(&hub).unwrap(), ImagePreprocess::dinov2());
    // google/vit-base-patch16-224's: an integer size is square for ViT.
    let vit_hub = write(
        "vit_hub",
        &[(
            "preprocessor_config.json",
            r#"{"do_normalize": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
               "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}"#,
        )],
    );
    assert_eq!(ImagePreprocess::for_model_dir(&vit_hub).unwrap(), ImagePreprocess::vit());
    let bit_int = write(
        "bit_int",
        &[("preprocessor_config.json", r#"{"image_processor_type": "BitImageProcessorFast", "size": 300, "crop_size": 256}"#)],
    );
    let p = ImagePreprocess::for_model_dir(&bit_int).unwrap();
    assert_eq!(p.resize, Some(Resize::ShortestEdge(300)));
    assert_eq!(p.center_crop, Some((256, 256)));

    let bert = write("bert", &[("config.json", r#"{"model_type": "bert"}"#)]);
    let msg = err_text(ImagePreprocess::for_model_dir(&bert));
    assert!(msg.contains("bert") && msg.contains("preprocessor_config.json"), "{msg}");
    let bad = write("bad", &[("preprocessor_config.json", r#"{"image_processor_type": "ViTImageProcessor", "resample": 0}"#)]);
    let msg = err_text(ImagePreprocess::for_model_dir(&bad));
    assert!(msg.contains("preprocessor_config.json") && msg.contains("NEAREST"), "{msg}");
    let clip = write("clip", &[("preprocessor_config.json", r#"{"image_processor_type": "CLIPImageProcessor"}"#)]);
    let msg = err_text(ImagePreprocess::for_model_dir(&clip));
    assert!(msg.contains("CLIPImageProcessor") && msg.contains("BitImageProcessor"), "{msg}");
}

#[test]
fn bad_image_folders_name_the_file_and_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    std::fs::copy(dir().join("images/bird/rgb_24x18.png"), root.join("a/ok.png")).unwrap();
    // A truncated PNG and a text file named .jpg.
    let png = std::fs::read(dir().join("images/bird/rgb_24x18.png")).unwrap();
    std::fs::write(root.join("b/cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(root.join("b/fake.jpg"), b"hello, not a jpeg").unwrap();
    let f = ImageFolder::open(root, ImagePreprocess::dinov2(), &Device::Cpu).unwrap();
    assert!(f.get_batch(&[0]).is_ok());
    let msg = err_text(f.get_batch(&[0, 1]));
    assert!(msg.contains("cut.png") && msg.contains("cannot decode"), "{msg}");
    let msg = err_text(f.get_batch(&[2]));
    assert!(msg.contains("fake.jpg") && msg.contains("not a PNG or JPEG"), "{msg}");
    let msg = err_text(f.get_batch(&[3]));
    assert!(msg.contains("out of range") && msg.contains('3'), "{msg}");
    assert!(err_text(f.get_batch(&[])).contains("no indices"));

    // Without crop, images of different sizes cannot share a batch.
    let no_crop = ImagePreprocess { center_crop: None, ..ImagePreprocess::dinov2() };
    let g = ImageFolder::open(&dir().join("images"), no_crop, &Device::Cpu).unwrap();
    let msg = err_text(g.get_batch(&[0, 1]));
    assert!(msg.contains("one size") && msg.contains("rgb_24x18.png"), "{msg}");

    // An empty class folder, an unsupported format, no class folders, no folder.
    std::fs::create_dir_all(root.join("c_empty")).unwrap();
    let msg = err_text(ImageFolder::open(root, ImagePreprocess::dinov2(), &Device::Cpu));
    assert!(msg.contains("c_empty") && msg.contains(".png"), "{msg}");
    std::fs::write(root.join("c_empty/x.bmp"), b"BM").unwrap();
    let msg = err_text(ImageFolder::open(root, ImagePreprocess::dinov2(), &Device::Cpu));
    assert!(msg.contains("x.bmp") && msg.contains("convert"), "{msg}");
    let msg = err_text(ImageFolder::open(&root.join("a"), ImagePreprocess::dinov2(), &Device::Cpu));
    assert!(msg.contains("no class sub-folders"), "{msg}");
    let msg = err_text(ImageFolder::open(&root.join("missing"), ImagePreprocess::dinov2(), &Device::Cpu));
    assert!(msg.contains("missing"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// IDX
// ------------------------------------------------------------------------------------------------

#[test]
fn idx_files_gz_and_raw_match_the_generator() {
    let e = expected();
    let d = dir().join("fashion-mnist-tiny");
    let train = IdxDataset::open_dir(&d, "train", ImagePreprocess::dinov2(), &Device::Cpu).unwrap();
    assert_eq!(train.len(), 5);
    assert_eq!(train.image_size(), (28, 28));
    assert_eq!(train.class_ids().unwrap(), as_u32s(&e["idx"]["train_labels"]));
    assert_eq!(train.label_names().unwrap(), FASHION_MNIST_CLASSES);
    let all: Vec<u8> = (0..5).flat_map(|i| train.raw_image(i).unwrap().data).collect();
    assert_eq!(sha_hex(&all), e["idx"]["train_pixel_sha256"].as_str().unwrap());
    let b = train.get_batch(&[0, 4]).unwrap();
    let px = b.inputs.pixel_values.unwrap();
    assert_eq!(px.dims(), [2, 3, 224, 224]);
    let v: Vec<f32> = px.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(f32_sha(&v), e["idx"]["train0_dinov2"]["sha256"].as_str().unwrap());
    assert_eq!(b.labels.to_vec1::<u32>().unwrap(), [9, 7]);

    let vit = IdxDataset::open_dir(&d, "train", ImagePreprocess::vit(), &Device::Cpu).unwrap();
    let v: Vec<f32> = vit.get_batch(&[0]).unwrap().inputs.pixel_values.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(f32_sha(&v), e["idx"]["train0_vit"]["sha256"].as_str().unwrap());

    let test = IdxDataset::open_dir(&d, "t10k", ImagePreprocess::vit(), &Device::Cpu).unwrap();
    assert_eq!(test.class_ids().unwrap(), as_u32s(&e["idx"]["t10k_labels"]));

    // open_image_classification recognises every layout.
    let dev = Device::Cpu;
    assert_eq!(open_image_classification(&d, ImagePreprocess::vit(), &dev).unwrap().len(), 5);
    let f = d.join("t10k-images-idx3-ubyte");
    assert_eq!(open_image_classification(&f, ImagePreprocess::vit(), &dev).unwrap().len(), 3);
    let folder = open_image_classification(&dir().join("images"), ImagePreprocess::vit(), &dev).unwrap();
    assert_eq!(folder.label_names().unwrap(), ["bird", "cat", "dog"]);

    // Outside a "fashion" path the class names are the label values.
    let t = tempfile::tempdir().unwrap();
    for f in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::copy(d.join(f), t.path().join(f)).unwrap();
    }
    let plain = IdxDataset::open_dir(t.path(), "t10k", ImagePreprocess::vit(), &Device::Cpu).unwrap();
    assert_eq!(plain.label_names().unwrap(), ["0", "1", "2", "3", "4", "5", "6", "7", "8"]);
}

#[test]
fn bad_idx_files_name_the_file_and_the_problem() {
    let d = dir().join("fashion-mnist-tiny");
    let raw = std::fs::read(d.join("t10k-images-idx3-ubyte")).unwrap();
    let msg = err_text(parse_idx(&raw[..raw.len() - 10], 3, "cut.idx"));
    assert!(msg.contains("cut.idx") && msg.contains("truncated"), "{msg}");
    let mut longer = raw.clone();
    longer.push(0);
    assert!(err_text(parse_idx(&longer, 3, "long.idx")).contains("longer than its header"));
    let mut magic = raw.clone();
    magic[0] = 7;
    assert!(err_text(parse_idx(&magic, 3, "m.idx")).contains("bad IDX magic"));
    let mut float = raw.clone();
    float[2] = 0x0D;
    assert!(err_text(parse_idx(&float, 3, "f.idx")).contains("0x0d"));
    assert!(err_text(parse_idx(&raw, 1, "swap.idx")).contains("swapped"));
    assert!(err_text(parse_idx(&raw[..2], 3, "tiny.idx")).contains("too short"));

    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    // Labels of another split: counts differ.
    std::fs::copy(d.join("t10k-images-idx3-ubyte"), p.join("t10k-images-idx3-ubyte")).unwrap();
    std::fs::copy(d.join("train-labels-idx1-ubyte.gz"), p.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let msg = err_text(IdxDataset::open_dir(p, "t10k", ImagePreprocess::vit(), &Device::Cpu));
    assert!(msg.contains("3 images") && msg.contains("5 labels"), "{msg}");
    // A corrupt gzip.
    let gz = std::fs::read(d.join("train-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(p.join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    std::fs::copy(d.join("train-labels-idx1-ubyte.gz"), p.join("train-labels-idx1-ubyte.gz")).unwrap();
    let msg = err_text(IdxDataset::open_dir(p, "train", ImagePreprocess::vit(), &Device::Cpu));
    assert!(msg.contains("train-images-idx3-ubyte.gz") && msg.contains("gzip"), "{msg}");
    let msg = err_text(IdxDataset::open_dir(p, "valid", ImagePreprocess::vit(), &Device::Cpu));
    assert!(msg.contains("valid-images-idx3-ubyte"), "{msg}");
    std::fs::copy(d.join("t10k-images-idx3-ubyte"), p.join("lonely-images-idx3-ubyte")).unwrap();
    let msg = err_text(open_image_classification(&p.join("lonely-images-idx3-ubyte"), ImagePreprocess::vit(), &Device::Cpu).map(|d| d.len()));
    assert!(msg.contains("lonely-labels-idx1-ubyte"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// Text
// ------------------------------------------------------------------------------------------------

fn tokenizer(padding: Padding) -> TextTokenizer {
    let opts = TokenizeOptions { max_length: Some(16), padding, ..Default::default() };
    TextTokenizer::from_file(&dir().join("tokenizer.json"), &opts).unwrap()
}

#[test]
fn csv_records_keep_quotes_commas_and_newlines() {
    let e = expected();
    let recs = read_csv(&dir().join("text/train.csv"), &Columns::default()).unwrap();
    assert_eq!(recs.len(), 7);
    assert_eq!(recs[0].text, "Win FREE money now, click here!");
    assert_eq!(recs[2].text, "He said \"hello, team\" and left");
    assert_eq!(recs[3].text, "Urgent: verify your account password\nor lose it, limited time only");
    let lines: Vec<u32> = recs.iter().map(|r| r.line as u32).collect();
    assert_eq!(lines, as_u32s(&e["text"]["csv_lines"]));
}

#[test]
fn tokenised_batches_equal_transformers() {
    let e = expected();
    let tok = tokenizer(Padding::Longest);
    assert!(tok.returns_token_type_ids());
    let ds = TextClassification::from_file(&dir().join("text/train.csv"), &Columns::default(), &tok, None, &Device::Cpu)
        .unwrap();
    assert_eq!(ds.label_map().names(), ["ham", "spam"]);
    assert_eq!(ds.class_ids().unwrap(), as_u32s(&e["text"]["csv_label_ids"]));
    assert_eq!(ds.task(), Task::TextClassification);
    let all: Vec<usize> = (0..7).collect();
    let b = ds.get_batch(&all).unwrap();
    let want = &e["text"]["longest"];
    for (name, t) in [
        ("input_ids", b.inputs.input_ids.as_ref()),
        ("attention_mask", b.inputs.attention_mask.as_ref()),
        ("token_type_ids", b.inputs.token_type_ids.as_ref()),
    ] {
        let t = t.unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype(), DType::I64, "{name}");
        assert_eq!(t.to_vec2::<i64>().unwrap(), as_i64_rows(&want[name]), "{name}");
    }
    assert_eq!(b.labels.to_vec1::<u32>().unwrap(), as_u32s(&e["text"]["csv_label_ids"]));
    // A batch pads to its own longest member.
    let b = ds.get_batch(&[4, 0]).unwrap();
    assert_eq!(b.inputs.input_ids.unwrap().dims(), [2, 10]);

    let fixed = tokenizer(Padding::MaxLength);
    let ds = TextClassification::from_file(&dir().join("text/train.csv"), &Columns::default(), &fixed, None, &Device::Cpu)
        .unwrap();
    let b = ds.get_batch(&[0, 1, 2]).unwrap();
    let want = &e["text"]["fixed_first3"];
    assert_eq!(b.inputs.input_ids.unwrap().to_vec2::<i64>().unwrap(), as_i64_rows(&want["input_ids"]));
    assert_eq!(b.inputs.attention_mask.unwrap().to_vec2::<i64>().unwrap(), as_i64_rows(&want["attention_mask"]));
}

#[test]
fn jsonl_integer_labels_and_a_shared_label_map() {
    let e = expected();
    let tok = tokenizer(Padding::Longest);
    let ds = TextClassification::from_file(&dir().join("text/train.jsonl"), &Columns::default(), &tok, None, &Device::Cpu)
        .unwrap();
    assert_eq!(ds.label_map().names(), ["0", "1"]);
    assert_eq!(ds.class_ids().unwrap(), as_u32s(&e["text"]["jsonl_label_ids"]));
    assert_eq!(ds.text(4), Some("Thanks for lunch"));
    assert_eq!(ds.line(4), Some(5));

    // An evaluation file uses the training map; an unknown label is refused.
    let t = tempfile::tempdir().unwrap();
    let eval = t.path().join("eval.jsonl");
    std::fs::write(&eval, "{\"text\": \"free cash\", \"label\": 1}\n\n{\"text\": \"hello\", \"label\": 2}\n").unwrap();
    let msg = err_text(TextClassification::from_file(
        &eval,
        &Columns::default(),
        &tok,
        Some(ds.label_map().clone()),
        &Device::Cpu,
    ));
    assert!(msg.contains("eval.jsonl:3") && msg.contains("\"2\"") && msg.contains("\"0\", \"1\""), "{msg}");
    let map = LabelMap::new(vec!["ham".into(), "spam".into()]).unwrap();
    assert_eq!(map.id("spam"), Some(1));
}

#[test]
fn bad_text_files_name_the_line_and_the_fix() {
    let tok = tokenizer(Padding::Longest);
    let t = tempfile::tempdir().unwrap();
    // The error message of opening `content` as `name`.
    let open = |name: &str, content: &str| -> String {
        let p = t.path().join(name);
        std::fs::write(&p, content).unwrap();
        err_text(TextClassification::from_file(&p, &Columns::default(), &tok, None, &Device::Cpu))
    };
    let msg = open("a.csv", "text,label\nhello,ham\n\"\",spam\n");
    assert!(msg.contains("a.csv:3") && msg.contains("empty text"), "{msg}");
    let msg = open("b.csv", "sentence,label\nhello,ham\n");
    assert!(msg.contains("b.csv") && msg.contains("no `text` column") && msg.contains("`sentence`"), "{msg}");
    let msg = open("c.csv", "text,label\nhello,ham\nhello,there,ham\n");
    assert!(msg.contains("c.csv:3") && msg.contains("malformed"), "{msg}");
    let msg = open("d.jsonl", "{\"text\": \"hi\", \"label\": 1}\n{\"text\": \"  \", \"label\": 0}\n");
    assert!(msg.contains("d.jsonl:2") && msg.contains("empty text"), "{msg}");
    let msg = open("e.jsonl", "{\"text\": \"hi\", \"label\": 1}\n{\"text\": \"x\", \"label\": 1.5}\n");
    assert!(msg.contains("e.jsonl:2") && msg.contains("string or an integer"), "{msg}");
    let msg = open("f.jsonl", "{\"text\": \"hi\", \"label\": 1}\nnot json\n");
    assert!(msg.contains("f.jsonl:2") && msg.contains("JSON"), "{msg}");
    let msg = open("g.jsonl", "{\"body\": \"hi\", \"label\": 1}\n");
    assert!(msg.contains("g.jsonl:1") && msg.contains("no `text` key") && msg.contains("`body`"), "{msg}");
    let msg = open("h.csv", "text,label\n");
    assert!(msg.contains("no records"), "{msg}");
    let msg = open("i.txt", "hello");
    assert!(msg.contains(".csv") && msg.contains(".jsonl"), "{msg}");

    // Tokenizer problems: an unknown pad token, and a tokenizer with none at all.
    let bad = TokenizeOptions { pad_token: Some("<nope>".into()), ..Default::default() };
    let msg = err_text(TextTokenizer::from_file(&dir().join("tokenizer.json"), &bad));
    assert!(msg.contains("<nope>") && msg.contains("tokenizer.json"), "{msg}");
    let wl = t.path().join("wordlevel.json");
    std::fs::write(
        &wl,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<unk>":0,"hello":1,"world":2},"unk_token":"<unk>"}}"#,
    )
    .unwrap();
    let no_pad = TextTokenizer::from_file(&wl, &TokenizeOptions::default()).unwrap();
    assert!(!no_pad.returns_token_type_ids());
    let data = t.path().join("two.csv");
    std::fs::write(&data, "text,label\nhello world,a\nhello,b\n").unwrap();
    let msg = err_text(TextClassification::from_file(&data, &Columns::default(), &no_pad, None, &Device::Cpu));
    assert!(msg.contains("wordlevel.json") && msg.contains("pad_token"), "{msg}");
    let msg = err_text(TextTokenizer::from_file(&t.path().join("nothing.json"), &TokenizeOptions::default()));
    assert!(msg.contains("nothing.json"), "{msg}");
}

#[test]
fn causal_lm_blocks_follow_group_texts() {
    let e = expected();
    let tok = tokenizer(Padding::Longest);
    let block = e["lm"]["block_size"].as_u64().unwrap() as usize;
    let ds = CausalLm::from_text_file(&dir().join("text/lm.txt"), &tok, &CausalLmOptions::new(block), &Device::Cpu)
        .unwrap();
    let want = as_i64_rows(&e["lm"]["blocks"]);
    assert_eq!(ds.len(), want.len());
    assert_eq!(ds.task(), Task::CausalLm);
    let idx: Vec<usize> = (0..ds.len()).collect();
    let b = ds.get_batch(&idx).unwrap();
    let ids = b.inputs.input_ids.as_ref().unwrap();
    assert_eq!(ids.dtype(), DType::I64);
    assert_eq!(ids.to_vec2::<i64>().unwrap(), want);
    assert_eq!(b.labels.to_vec2::<i64>().unwrap(), want);
    assert_eq!(b.inputs.attention_mask.unwrap().sum_all().unwrap().to_scalar::<i64>().unwrap() as usize, want.len() * block);
    assert!(b.inputs.token_type_ids.is_none());

    let opts = CausalLmOptions { keep_linebreaks: false, ..CausalLmOptions::new(block) };
    let ds = CausalLm::from_text_file(&dir().join("text/lm.txt"), &tok, &opts, &Device::Cpu).unwrap();
    assert_eq!(
        ds.get_batch(&[0, 1]).unwrap().inputs.input_ids.unwrap().to_vec2::<i64>().unwrap(),
        as_i64_rows(&e["lm"]["blocks_no_linebreaks"])[..2]
    );

    // A byte-level BPE (GPT-2 style, no pad token): line breaks are tokens of their own.
    let bpe = TextTokenizer::from_file(&dir().join("tokenizer_bpe.json"), &TokenizeOptions::default()).unwrap();
    assert_eq!(bpe.pad_id(), None);
    assert!(!bpe.returns_token_type_ids());
    for (keep, key) in [(true, "bpe_blocks"), (false, "bpe_blocks_no_linebreaks")] {
        let opts = CausalLmOptions { keep_linebreaks: keep, ..CausalLmOptions::new(block) };
        let ds = CausalLm::from_text_file(&dir().join("text/lm.txt"), &bpe, &opts, &Device::Cpu).unwrap();
        let want = as_i64_rows(&e["lm"][key]);
        let idx: Vec<usize> = (0..ds.len()).collect();
        assert_eq!(ds.get_batch(&idx).unwrap().inputs.input_ids.unwrap().to_vec2::<i64>().unwrap(), want, "{key}");
    }
    assert_ne!(e["lm"]["bpe_blocks"], e["lm"]["bpe_blocks_no_linebreaks"]);

    let msg = err_text(CausalLm::from_text("hello", Path::new("short.txt"), &tok, &CausalLmOptions::new(64), &Device::Cpu));
    assert!(msg.contains("short.txt") && msg.contains("block_size"), "{msg}");
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("latin1.txt");
    std::fs::write(&bad, b"ok\ncaf\xe9\n").unwrap();
    let msg = err_text(CausalLm::from_text_file(&bad, &tok, &CausalLmOptions::new(4), &Device::Cpu));
    assert!(msg.contains("latin1.txt:2") && msg.contains("UTF-8"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// Splits
// ------------------------------------------------------------------------------------------------

#[test]
fn randperm_and_random_split_equal_torch() {
    let e = expected();
    for case in e["randperm"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_u64().unwrap();
        let p = randperm(n, seed);
        if let Some(perm) = case.get("perm") {
            assert_eq!(p, as_u32s(perm).into_iter().map(|x| x as usize).collect::<Vec<_>>(), "n={n} seed={seed}");
        } else {
            let head: Vec<usize> = as_u32s(&case["head"]).into_iter().map(|x| x as usize).collect();
            assert_eq!(p[..16], head[..], "n={n} seed={seed}");
            let sum: u64 = p.iter().enumerate().map(|(i, &x)| (i as u64 + 1) * x as u64).sum();
            assert_eq!(sum, case["checksum"].as_u64().unwrap());
        }
    }
    let rs = &e["random_split_50_40_10_seed7"];
    let s = train_val_split(50, ValSize::Count(10), 7, None).unwrap();
    let to_usize = |v: &Value| as_u32s(v).into_iter().map(|x| x as usize).collect::<Vec<_>>();
    assert_eq!(s.train, to_usize(&rs["train"]));
    assert_eq!(s.val, to_usize(&rs["val"]));
    assert_eq!(train_val_split(50, ValSize::Fraction(0.2), 7, None).unwrap(), s);
}

#[test]
fn splits_are_reproducible_disjoint_and_stratified() {
    // VTAB-1k: 1000 = 800 + 200, the rest held out.
    let s = train_size_subset(5000, 1000, 3, None).unwrap();
    assert_eq!((s.train.len(), s.val.len(), s.rest.len()), (800, 200, 4000));
    assert_eq!(s, train_size_subset(5000, 1000, 3, None).unwrap());
    assert_ne!(s, train_size_subset(5000, 1000, 4, None).unwrap());
    let mut all: Vec<usize> = s.train.iter().chain(&s.val).chain(&s.rest).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..5000).collect::<Vec<_>>());

    // Stratified: 70 % class 0, 20 % class 1, 10 % class 2.
    let labels: Vec<u32> = (0..1000).map(|i| if i % 10 < 7 { 0 } else if i % 10 < 9 { 1 } else { 2 }).collect();
    let count = |idx: &[usize], c: u32| idx.iter().filter(|&&i| labels[i] == c).count();
    let s = train_val_split(1000, ValSize::Fraction(0.25), 9, Some(&labels)).unwrap();
    assert_eq!(s.val.len(), 250);
    assert_eq!([count(&s.val, 0), count(&s.val, 1), count(&s.val, 2)], [175, 50, 25]);
    assert_eq!(s.train.len(), 750);
    let s = train_size_subset(1000, 100, 9, Some(&labels)).unwrap();
    assert_eq!((s.train.len(), s.val.len()), (80, 20));
    assert_eq!([count(&s.val, 0), count(&s.val, 1), count(&s.val, 2)], [14, 4, 2]);
    assert_eq!([count(&s.train, 0), count(&s.train, 1), count(&s.train, 2)], [56, 16, 8]);

    assert!(err_text(train_size_subset(10, 11, 0, None)).contains("larger than the data set"));
    assert!(err_text(train_val_split(10, ValSize::Fraction(1.0), 0, None)).contains("between 0 and 1"));
    assert!(err_text(train_val_split(10, ValSize::Count(10), 0, None)).contains("at least one"));
    assert!(err_text(train_val_split(10, ValSize::Count(2), 0, Some(&[0, 1]))).contains("2 labels for 10"));
}

#[test]
fn subsets_map_indices_and_class_ids() {
    let tok = tokenizer(Padding::Longest);
    let ds: Arc<dyn Dataset> = Arc::new(
        TextClassification::from_file(&dir().join("text/train.csv"), &Columns::default(), &tok, None, &Device::Cpu)
            .unwrap(),
    );
    let s = train_val_split(ds.len(), ValSize::Count(2), 1, ds.class_ids()).unwrap();
    let val = Subset::new(ds.clone(), s.val.clone()).unwrap();
    assert_eq!(val.len(), 2);
    let want: Vec<u32> = s.val.iter().map(|&i| ds.class_ids().unwrap()[i]).collect();
    assert_eq!(val.class_ids().unwrap(), want);
    let a = val.get_batch(&[1]).unwrap().inputs.input_ids.unwrap().to_vec2::<i64>().unwrap();
    let b = ds.get_batch(&[s.val[1]]).unwrap().inputs.input_ids.unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(a, b);
    assert!(err_text(val.get_batch(&[2])).contains("out of range"));
    assert!(Subset::new(ds, vec![7]).is_err());
}

/// Writes this crate's preprocessing of the images listed in `$PVERA_PREPROCESS_JOBS` (a JSON
/// list of `{"path", "config", "out"}` or `{"idx", "index", "config", "out"}`) as raw f32 files,
/// for `tools/measure_preprocess.py` to compare with transformers.
#[test]
#[ignore = "driven by tools/measure_preprocess.py"]
fn preprocess_dump_for_measurement() {
    let Ok(jobs) = std::env::var("PVERA_PREPROCESS_JOBS") else { return };
    let jobs: Value = serde_json::from_str(&std::fs::read_to_string(jobs).unwrap()).unwrap();
    let mut idx_cache: std::collections::HashMap<String, IdxDataset> = Default::default();
    for job in jobs.as_array().unwrap() {
        let p = match job["config"].as_str().unwrap() {
            "dinov2" => ImagePreprocess::dinov2(),
            "vit" => ImagePreprocess::vit(),
            other => panic!("config {other}"),
        };
        let img = if let Some(path) = job["path"].as_str() {
            decode_image_file(Path::new(path)).unwrap()
        } else {
            let stem = job["idx"].as_str().unwrap().to_string();
            let d = idx_cache.entry(stem.clone()).or_insert_with(|| {
                let (dir, split) = stem.rsplit_once('/').unwrap();
                IdxDataset::open_dir(Path::new(dir), split, ImagePreprocess::vit(), &Device::Cpu).unwrap()
            });
            d.raw_image(job["index"].as_u64().unwrap() as usize).unwrap()
        };
        let t: Tensor = p.to_tensor(&img, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(job["out"].as_str().unwrap(), bytes).unwrap();
    }
}
