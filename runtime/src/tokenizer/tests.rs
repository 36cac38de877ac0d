//! Tokenizer tests: synthetic byte-level BPEs built through the GGUF path,
//! cl100k_base against tiktoken's own outputs, and SmolLM2's GGUF tokenizer
//! against Hugging Face transformers' reference encodings.
//!
//! Fixture-based tests print `SKIPPED` and return when `.fixtures/` lacks
//! their file (run scripts/fixtures.sh and scripts/fixtures-tokenizers.sh).

use std::path::{Path, PathBuf};

use super::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The fixture's path, or `None` after a loud skip notice.
fn fixture(name: &str, script: &str) -> Option<PathBuf> {
    let path = repo_root().join(".fixtures").join(name);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("SKIPPED: .fixtures/{name} is missing; run {script}");
        None
    }
}

// ---------------------------------------------------------------------------
// A synthetic byte-level BPE, built from GGUF-style metadata.

/// GPT-2's byte-to-character spelling of `bytes`.
fn spell(bytes: &[u8]) -> String {
    let mut map = Vec::new();
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        map.push(if printable {
            b
        } else {
            next += 1;
            next - 1
        });
    }
    bytes
        .iter()
        .map(|&b| char::from_u32(map[b as usize]).unwrap())
        .collect()
}

/// Ids 0-2 are control tokens, 3-258 the bytes, then merge results.
fn toy_meta() -> GgufTokenizerMeta {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(spell(&[b]));
        types.push(1);
    }
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ Ġ",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    GgufTokenizerMeta {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        merges: merges.iter().map(|m| m.to_string()).collect(),
        token_types: types,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        ..Default::default()
    }
}

fn toy(options: GgufTokenizerOptions) -> Tokenizer {
    Tokenizer::from_gguf_meta(&toy_meta(), &options).unwrap()
}

fn id(t: &Tokenizer, token: &str) -> u32 {
    t.token_to_id(token)
        .unwrap_or_else(|| panic!("no token {token:?}"))
}

#[test]
fn gguf_built_tokenizer_encodes_by_merges() {
    let t = toy(Default::default());
    assert_eq!(t.kind(), "huggingface");
    assert_eq!(t.vocab_size(), 3 + 256 + 10);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    let ids = t.encode("hello world", false);
    assert_eq!(ids, vec![id(&t, "hello"), id(&t, "Ġworld")]);
    assert_eq!(t.decode(&ids), "hello world");
    assert_eq!(t.id_to_token(ids[1]).as_deref(), Some("Ġworld"));
}

#[test]
fn gguf_control_tokens_are_special() {
    let t = toy(Default::default());
    let ids = t.encode("<|im_start|>hello<|im_end|>", false);
    assert_eq!(ids, vec![1, id(&t, "hello"), 2]);
    assert_eq!(t.decode(&ids), "<|im_start|>hello<|im_end|>");
}

#[test]
fn gguf_bos_only_when_asked() {
    let plain = toy(Default::default());
    assert_eq!(plain.encode("hello", true), vec![id(&plain, "hello")]);
    let with_bos = toy(GgufTokenizerOptions {
        add_bos: true,
        ..Default::default()
    });
    let hello = id(&with_bos, "hello");
    assert_eq!(with_bos.encode("hello", true), vec![1, hello]);
    assert_eq!(with_bos.encode("hello", false), vec![hello]);
}

#[test]
fn gguf_pre_readings_differ_only_where_documented() {
    let tf = toy(Default::default());
    let orig = toy(GgufTokenizerOptions {
        pre_tokenizer: GgufPreTokenizer::Original,
        ..Default::default()
    });
    let (a, sp, sp2, one) = (id(&tf, "a"), id(&tf, "Ġ"), id(&tf, "ĠĠ"), id(&tf, "1"));
    // GPT-2's regex keeps " 1" together and leaves the first space alone...
    assert_eq!(tf.encode("a  1", false), vec![a, sp, sp, one]);
    // ...while Digits first cuts the digit off, so the spaces form one chunk.
    assert_eq!(orig.encode("a  1", false), vec![a, sp2, one]);
    // Elsewhere they agree (SmolLM2, like this toy, has no merge joining a
    // digit to anything, so " 1" is `Ġ`, `1` either way).
    for text in ["hello world", "a 1", "hello  world", "12 34", "x\n\n7"] {
        assert_eq!(tf.encode(text, false), orig.encode(text, false), "{text:?}");
    }
    for t in [&tf, &orig] {
        assert_eq!(t.decode(&t.encode("a  1", false)), "a  1");
    }
}

#[test]
fn gguf_json_loads_from_a_file_with_its_config() {
    let dir = std::env::temp_dir().join(format!("caramba-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = tokenizer_json_from_gguf(&toy_meta(), &Default::default()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    let t = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (None, None));
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}}"#,
    )
    .unwrap();
    let t = Tokenizer::from_hf_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(0)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let e = Tokenizer::from_hf_json("{\"model\": 3}").unwrap_err();
    assert!(e.to_string().contains("not a usable tokenizer.json"), "{e}");
    let mut meta = toy_meta();
    meta.merges.push("a b c".into());
    let e = tokenizer_json_from_gguf(&meta, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("merges[10]"), "{e}");
    let mut meta = toy_meta();
    meta.pre = Some("mystery".into());
    let e = Tokenizer::from_gguf_meta(&meta, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("\"mystery\""), "{e}");
    let fallback = GgufTokenizerOptions {
        pre_tokenizer: GgufPreTokenizer::ByteLevel,
        ..Default::default()
    };
    assert!(Tokenizer::from_gguf_meta(&meta, &fallback).is_ok());
    let mut meta = toy_meta();
    meta.tokens[5] = meta.tokens[4].clone();
    let e = tokenizer_json_from_gguf(&meta, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("appears twice"), "{e}");
    let e = Tokenizer::from_file(Path::new("x.model")).unwrap_err();
    assert!(e.to_string().contains("x.model"), "{e}");
}

// ---------------------------------------------------------------------------
// cl100k_base (fixture: scripts/fixtures-tokenizers.sh).

const TIKTOKEN_SCRIPT: &str = "scripts/fixtures-tokenizers.sh";

fn cl100k() -> Option<Tokenizer> {
    let path = fixture("cl100k_base.tiktoken", TIKTOKEN_SCRIPT)?;
    Some(Tokenizer::cl100k_base(&path).unwrap())
}

/// Encodings produced by OpenAI's tiktoken 0.12 (`allowed_special="all"`)
/// from the same rank file; the first eight are tiktoken's own test cases.
const CL100K_CASES: &[(&str, &[u32])] = &[
    ("hello world", &[15339, 1917]),
    ("rer", &[38149]),
    ("'rer", &[2351, 81]),
    ("today\n ", &[31213, 198, 220]),
    ("today\n \n", &[31213, 27907]),
    ("today\n  \n", &[31213, 14211]),
    (" \u{85}0", &[220, 126, 227, 15]),
    ("👍", &[9468, 239, 235]),
    (
        "In the beginning God created the heaven and the earth.",
        &[644, 279, 7314, 4359, 3549, 279, 23070, 323, 279, 9578, 13],
    ),
    (
        "It's 12345 o'clock — naïve café, 東京タワー!!\n\n\tTabs   and    spaces  ",
        &[
            2181, 596, 220, 4513, 1774, 297, 63510, 2001, 95980, 588, 53050, 11, 61696, 109, 47653,
            47307, 2845, 107, 11972, 25833, 10473, 3518, 256, 323, 262, 12908, 256,
        ],
    ),
    (
        "def f(x):\n    return x**2  # square\n",
        &[
            755, 282, 2120, 997, 262, 471, 865, 334, 17, 220, 674, 9518, 198,
        ],
    ),
    (
        "I'VE WE'LL they're",
        &[40, 6, 4592, 20255, 6, 4178, 814, 2351],
    ),
    (
        "<|endoftext|>between<|fim_prefix|>",
        &[100257, 42967, 100258],
    ),
    (
        "ＡＢＣ１２３",
        &[1569, 94, 1569, 95, 1569, 96, 20713, 25963, 34617],
    ),
    ("\r\n\r\n  x", &[881, 220, 865]),
    (
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        &[70540, 70540, 70540, 70540, 70540, 70540, 5418],
    ),
];

#[test]
fn cl100k_matches_tiktoken() {
    let Some(t) = cl100k() else { return };
    assert_eq!(t.kind(), "tiktoken");
    assert_eq!(t.vocab_size(), 100277);
    assert_eq!((t.bos_id(), t.eos_id()), (None, Some(100257)));
    for (text, want) in CL100K_CASES {
        assert_eq!(&t.encode(text, false), want, "encoding {text:?}");
        assert_eq!(&t.decode(want), text, "decoding {want:?}");
    }
    assert_eq!(t.id_to_token(15339).as_deref(), Some("hello"));
    assert_eq!(t.token_to_id("hello"), Some(15339));
    assert_eq!(t.token_to_id("<|endofprompt|>"), Some(100276));
}

/// The same order-sensitive hash the reference numbers were computed with.
fn id_hash(ids: &[u32]) -> u64 {
    ids.iter().fold(0u64, |h, &t| {
        h.wrapping_mul(1_000_003).wrapping_add(t as u64)
    })
}

fn kjv_verses(n: usize) -> Option<Vec<String>> {
    let path = fixture("kjv.jsonl", "scripts/fixtures.sh")?;
    let text = std::fs::read_to_string(path).unwrap();
    Some(
        text.lines()
            .take(n)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["text"].as_str().unwrap().to_string()
            })
            .collect(),
    )
}

#[test]
fn cl100k_matches_tiktoken_on_2000_kjv_verses() {
    let Some(t) = cl100k() else { return };
    let Some(verses) = kjv_verses(2000) else {
        return;
    };
    let text = verses.join("\n");
    let ids = t.encode(&text, false);
    // tiktoken: 65116 tokens for these 265280 characters.
    assert_eq!(text.chars().count(), 265_280);
    assert_eq!(ids.len(), 65116);
    assert_eq!(id_hash(&ids), 2_551_987_198_394_393_411);
    assert_eq!(t.decode(&ids), text);
}

#[test]
fn cl100k_round_trips_awkward_text() {
    let Some(t) = cl100k() else { return };
    for text in [
        "",
        " ",
        "\n\n\n",
        "a\u{0}b",
        "ünïcödé  \t\r\n",
        "🦀🦀 crab",
        "1234567890",
    ] {
        assert_eq!(t.decode(&t.encode(text, false)), text, "{text:?}");
    }
    // A cut through a multi-byte character decodes lossily, not with a panic.
    let crab = t.encode("🦀", false);
    assert!(crab.len() > 1);
    assert!(t.decode(&crab[..1]).contains('\u{FFFD}'));
}

// ---------------------------------------------------------------------------
// SmolLM2's tokenizer from its GGUF (fixture: scripts/fixtures.sh).

const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2_meta() -> Option<GgufTokenizerMeta> {
    let path = fixture(SMOLLM2_GGUF, "scripts/fixtures.sh")?;
    let gguf = crate::checkpoint::Gguf::open(&path).unwrap();
    Some(gguf.tokenizer_meta().unwrap())
}

#[test]
fn smollm2_gguf_tokenizer_basics() {
    let Some(meta) = smollm2_meta() else { return };
    assert_eq!(meta.model, "gpt2");
    assert_eq!(meta.pre.as_deref(), Some("smollm"));
    let t = Tokenizer::from_gguf_meta(&meta, &Default::default()).unwrap();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert_eq!(t.id_to_token(1).as_deref(), Some("<|im_start|>"));
    // No BOS by default, even with add_special.
    let hello = t.encode("Hello world", true);
    assert_eq!(hello, t.encode("Hello world", false));
    assert_ne!(hello.first(), Some(&1));
    let chat = "<|im_start|>user\nHi there<|im_end|>\n";
    let ids = t.encode(chat, false);
    assert_eq!(ids.first(), Some(&1));
    assert!(ids.contains(&2));
    assert_eq!(t.decode(&ids), chat);
    // The two readings of `smollm` part only where spaces run into a digit.
    let orig = GgufTokenizerOptions {
        pre_tokenizer: GgufPreTokenizer::Original,
        ..Default::default()
    };
    let orig = Tokenizer::from_gguf_meta(&meta, &orig).unwrap();
    let (sp, sp2) = (id(&t, "Ġ"), id(&t, "ĠĠ"));
    let (a, one) = (id(&t, "a"), id(&t, "1"));
    assert_eq!(t.encode("a  1", false), vec![a, sp, sp, one]);
    assert_eq!(orig.encode("a  1", false), vec![a, sp2, one]);
    assert_eq!(t.encode("a 12", false), orig.encode("a 12", false));
    // Loading by file name gives the same tokenizer.
    let path = fixture(SMOLLM2_GGUF, "scripts/fixtures.sh").unwrap();
    let by_name = Tokenizer::from_file(&path).unwrap();
    assert_eq!(by_name.encode(chat, false), t.encode(chat, false));
    assert_eq!(by_name.eos_id(), Some(2));
    let Some(verses) = kjv_verses(200) else {
        return;
    };
    let text = verses.join(" ");
    let ids = t.encode(&text, false);
    assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    assert_eq!(t.decode(&ids), text);
}

/// One reference encoding dumped from transformers.
#[derive(serde::Deserialize)]
struct ReferenceCase {
    text: String,
    ids: Vec<u32>,
}

/// Compares against `tests/data/hf_reference/tokenizer_cases.json`, the
/// encodings Hugging Face transformers produced for this GGUF (no special
/// tokens added). That file is committed; its absence is a failure, not a skip.
#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let Some(meta) = smollm2_meta() else { return };
    let cases_path = repo_root().join("tests/data/hf_reference/tokenizer_cases.json");
    let text = std::fs::read_to_string(&cases_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; this reference file is dumped once with transformers (see \
             tests/data/hf_reference/) and committed; it should be in the repository",
            cases_path.display()
        )
    });
    let cases: Vec<ReferenceCase> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not a list of {{text, ids}}: {e}", cases_path.display()));
    assert!(!cases.is_empty(), "{} has no cases", cases_path.display());
    let t = Tokenizer::from_gguf_meta(&meta, &Default::default()).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let got = t.encode(&case.text, false);
        if got != case.ids {
            failures.push(format!(
                "{:?}:\n  transformers {:?}\n  caramba      {:?}",
                case.text, case.ids, got
            ));
        }
        let back = t.decode(&case.ids);
        if back != case.text {
            failures.push(format!("decoding {:?} gave {back:?}", case.text));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The 300 kB KJV stretch transformers tokenized in one call
/// (`tests/data/hf_reference/tokenizer_kjv.json` states the rule), compared
/// id for id with `tokenizer_kjv.npy`.
#[test]
fn smollm2_gguf_tokenizer_matches_transformers_on_kjv() {
    let Some(meta) = smollm2_meta() else { return };
    let dir = repo_root().join("tests/data/hf_reference");
    let info_path = dir.join("tokenizer_kjv.json");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; this committed reference file is missing",
                info_path.display()
            )
        }))
        .unwrap();
    let n_verses = info["n_verses"].as_u64().unwrap() as usize;
    let Some(verses) = kjv_verses(n_verses) else {
        return;
    };
    let text = verses.join(" ");
    assert_eq!(
        text.len() as u64,
        info["byte_len"].as_u64().unwrap(),
        "KJV text differs from the reference's"
    );
    let want = crate::data::NpyTokens::open(&dir.join("tokenizer_kjv.npy"))
        .unwrap()
        .to_vec();
    assert_eq!(want.len() as u64, info["n_tokens"].as_u64().unwrap());

    let t = Tokenizer::from_gguf_meta(&meta, &Default::default()).unwrap();
    let got = t.encode(&text, false);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let lo = i.saturating_sub(5);
        panic!(
            "first difference at token {i}: transformers {:?}, caramba {:?}",
            &want[lo..(i + 5).min(want.len())],
            &got[lo..(i + 5).min(got.len())]
        );
    }
    assert_eq!(got.len(), want.len());
    assert_eq!(t.decode(&got), text);
}
