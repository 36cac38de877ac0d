//! Corpus preparation: text in, a `.npy` file of token ids out.
//!
//! Inputs are `.txt` (the whole file is one document) or `.jsonl` (one
//! JSON object per line; the document is the string under `field`, `text`
//! by default; blank lines are skipped). Each document is encoded without
//! the tokenizer's post-processor (so no BOS) and, when the tokenizer has an
//! EOS token, followed by EOS: documents are then separated in the stream,
//! and concatenating two prepared files gives the same stream as preparing
//! their concatenation. The output is `uint16` when every id fits
//! (`vocab_size <= 65536`), else `uint32`, written atomically.
//!
//! The whole token array is held in memory before writing; a `.txt` input is
//! encoded in one call, so its progress bar jumps from empty to full.

use std::io::BufRead as _;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::npy::{write_tokens, NpyDtype};
use super::DataError;
use crate::tokenizer::Tokenizer;

/// Options for [`prepare_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareOptions {
    /// The JSON field holding each document in a `.jsonl` input.
    pub field: String,
    /// Draw a progress bar (by input bytes) on stderr.
    pub progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            field: "text".to_string(),
            progress: false,
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareStats {
    pub documents: usize,
    /// Tokens written, EOS separators included.
    pub tokens: usize,
    pub input_bytes: u64,
    pub dtype: NpyDtype,
    pub vocab_size: usize,
    /// The id appended after each document, if the tokenizer has an EOS.
    pub eos_separator: Option<u32>,
}

/// Tokenizes `input` into `output` with the default options (`.jsonl`
/// field `text`); see the module docs for the format.
pub fn prepare(
    tokenizer: &Tokenizer,
    input: &Path,
    output: &Path,
    progress: bool,
) -> Result<PrepareStats, DataError> {
    let options = PrepareOptions {
        progress,
        ..PrepareOptions::default()
    };
    prepare_with(tokenizer, input, output, &options)
}

/// Documents are encoded in parallel in chunks of about this many bytes.
const CHUNK_BYTES: usize = 1 << 20;

pub fn prepare_with(
    tokenizer: &Tokenizer,
    input: &Path,
    output: &Path,
    options: &PrepareOptions,
) -> Result<PrepareStats, DataError> {
    let io = |source| DataError::Io {
        path: input.to_path_buf(),
        source,
    };
    let input_bytes = std::fs::metadata(input).map_err(io)?.len();
    let bar = if options.progress {
        let bar = ProgressBar::new(input_bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .expect("the progress template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(format!("tokenizing {}", input.display()));
        bar
    } else {
        ProgressBar::hidden()
    };

    let eos = tokenizer.eos_id();
    let encode = |doc: &str| -> Result<Vec<u32>, DataError> {
        let mut ids = tokenizer.try_encode(doc, false)?;
        ids.extend(eos);
        Ok(ids)
    };

    let ext = input.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut tokens: Vec<u32> = Vec::new();
    let documents = match ext {
        "txt" => {
            let bytes = std::fs::read(input).map_err(io)?;
            let text = String::from_utf8(bytes).map_err(|e| DataError::Input {
                path: input.to_path_buf(),
                reason: format!(
                    "not UTF-8 (first bad byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            })?;
            tokens = encode(&text)?;
            bar.inc(input_bytes);
            1
        }
        "jsonl" => {
            let reader = std::io::BufReader::new(std::fs::File::open(input).map_err(io)?);
            let mut documents = 0;
            // (1-based line number, line) pairs waiting to be encoded.
            let mut chunk: Vec<(usize, String)> = Vec::new();
            let mut chunk_bytes = 0;
            let flush = |chunk: &mut Vec<(usize, String)>, tokens: &mut Vec<u32>| {
                let docs: Vec<Vec<u32>> = chunk
                    .par_iter()
                    .map(|(line, text)| {
                        let doc =
                            document(text, &options.field).map_err(|reason| DataError::Jsonl {
                                path: input.to_path_buf(),
                                line: *line,
                                reason,
                            })?;
                        encode(&doc)
                    })
                    .collect::<Result<_, _>>()?;
                for d in docs {
                    tokens.extend_from_slice(&d);
                }
                chunk.clear();
                Ok::<_, DataError>(())
            };
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(io)?;
                let len = line.len() as u64 + 1;
                if !line.trim().is_empty() {
                    chunk_bytes += line.len();
                    chunk.push((i + 1, line));
                    documents += 1;
                }
                bar.inc(len);
                if chunk_bytes >= CHUNK_BYTES {
                    flush(&mut chunk, &mut tokens)?;
                    chunk_bytes = 0;
                }
            }
            flush(&mut chunk, &mut tokens)?;
            documents
        }
        _ => {
            return Err(DataError::Input {
                path: input.to_path_buf(),
                reason: "expected a .txt or .jsonl file".into(),
            })
        }
    };

    let vocab_size = tokenizer.vocab_size();
    let dtype = NpyDtype::for_vocab(vocab_size);
    write_tokens(output, &tokens, dtype)?;
    bar.finish_and_clear();
    Ok(PrepareStats {
        documents,
        tokens: tokens.len(),
        input_bytes,
        dtype,
        vocab_size,
        eos_separator: eos,
    })
}

/// The document in one `.jsonl` line, or why there is none.
fn document(line: &str, field: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON value: {e}"))?;
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field {field:?} is not a string but {other}")),
        None => Err(format!("no field {field:?} in this object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npy::NpyTokens;
    use crate::tokenizer::tiktoken::{TiktokenBpe, CL100K_PATTERN};

    /// A byte-level tokenizer (id = byte) with EOS 256.
    fn bytes_tokenizer() -> Tokenizer {
        use base64::Engine as _;
        let lines: Vec<String> = (0..=255u8)
            .map(|b| {
                format!(
                    "{} {b}",
                    base64::engine::general_purpose::STANDARD.encode([b])
                )
            })
            .collect();
        let bpe = TiktokenBpe::from_rank_text(
            &lines.join("\n"),
            CL100K_PATTERN,
            vec![("<eos>".into(), 256)],
        )
        .unwrap();
        Tokenizer::from_tiktoken(bpe, None, Some(256))
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("caramba-prep-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn jsonl_documents_are_each_followed_by_eos() {
        let dir = tmpdir("jsonl");
        let input = dir.join("c.jsonl");
        std::fs::write(
            &input,
            "{\"text\": \"ab\", \"id\": 1}\n\n{\"text\": \"c\"}\n",
        )
        .unwrap();
        let out = dir.join("c.npy");
        let stats = prepare(&bytes_tokenizer(), &input, &out, false).unwrap();
        assert_eq!(stats.documents, 2);
        assert_eq!(stats.tokens, 5);
        assert_eq!(stats.dtype, NpyDtype::U16);
        assert_eq!(
            NpyTokens::open(&out).unwrap().to_vec(),
            vec![97, 98, 256, 99, 256]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn txt_is_one_document_and_field_is_configurable() {
        let dir = tmpdir("txt");
        let input = dir.join("c.txt");
        std::fs::write(&input, "hi\nthere").unwrap();
        let out = dir.join("c.npy");
        let stats = prepare(&bytes_tokenizer(), &input, &out, true).unwrap();
        assert_eq!((stats.documents, stats.tokens), (1, 9));
        assert_eq!(NpyTokens::open(&out).unwrap().get(8), 256);

        let input = dir.join("d.jsonl");
        std::fs::write(&input, "{\"body\": \"x\"}\n").unwrap();
        let opts = PrepareOptions {
            field: "body".into(),
            progress: false,
        };
        let stats = prepare_with(&bytes_tokenizer(), &input, &out, &opts).unwrap();
        assert_eq!(stats.tokens, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let dir = tmpdir("bad");
        let out = dir.join("c.npy");
        let input = dir.join("c.jsonl");
        std::fs::write(&input, "{\"text\": \"ok\"}\n{\"txt\": \"typo\"}\n").unwrap();
        let e = prepare(&bytes_tokenizer(), &input, &out, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.jsonl:2") && e.contains("no field \"text\""),
            "{e}"
        );
        std::fs::write(&input, "{\"text\": 3}\n").unwrap();
        let e = prepare(&bytes_tokenizer(), &input, &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":1") && e.contains("not a string"), "{e}");
        std::fs::write(&input, "not json\n").unwrap();
        let e = prepare(&bytes_tokenizer(), &input, &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a JSON value"), "{e}");
        assert!(!out.exists(), "a failed run must not leave an output");
        std::fs::write(dir.join("c.csv"), "a,b\n").unwrap();
        let e = prepare(&bytes_tokenizer(), &dir.join("c.csv"), &out, false).unwrap_err();
        assert!(e.to_string().contains("expected a .txt or .jsonl"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// The real corpus and tokenizer (fixtures from scripts/fixtures.sh).
#[cfg(test)]
mod fixture_tests {
    use super::*;
    use crate::data::npy::NpyTokens;

    #[test]
    fn prepares_kjv_with_smollm2() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join(".fixtures");
        let (gguf, kjv) = (
            root.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
            root.join("kjv.jsonl"),
        );
        if !gguf.exists() || !kjv.exists() {
            eprintln!(
                "SKIPPED: .fixtures/ lacks the SmolLM2 GGUF or kjv.jsonl; run scripts/fixtures.sh"
            );
            return;
        }
        let meta = crate::checkpoint::Gguf::open(&gguf)
            .unwrap()
            .tokenizer_meta()
            .unwrap();
        let tok = Tokenizer::from_gguf_meta(&meta, &Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("caramba-prep-kjv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("kjv.npy");
        let stats = prepare(&tok, &kjv, &out, false).unwrap();
        assert_eq!(stats.documents, 31_103);
        assert_eq!(stats.dtype, NpyDtype::U16);
        assert_eq!(stats.eos_separator, Some(2));
        let tokens = NpyTokens::open(&out).unwrap();
        assert_eq!(tokens.len(), stats.tokens);
        // The stream is each verse's encoding followed by EOS, in file order.
        let text = std::fs::read_to_string(&kjv).unwrap();
        let mut at = 0;
        for line in text.lines().take(50) {
            let doc = document(line, "text").unwrap();
            let mut want = tok.encode(&doc, false);
            want.push(2);
            let mut got = vec![0; want.len()];
            tokens.read_into(at, &mut got);
            assert_eq!(got, want, "{doc:?}");
            at += want.len();
        }
        let eos_count = tokens.to_vec().iter().filter(|&&t| t == 2).count();
        assert_eq!(eos_count, 31_103);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
