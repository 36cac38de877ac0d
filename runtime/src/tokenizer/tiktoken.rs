//! tiktoken-style byte-pair encoding: a rank file (one `base64-token rank`
//! per line), a pre-tokenization regex, and merging by rank.
//!
//! Encoding splits the text at special tokens, splits each ordinary stretch
//! with the regex, and turns each piece into tokens by repeatedly merging the
//! adjacent pair whose concatenation has the lowest rank, exactly as OpenAI's
//! tiktoken does. Decoding concatenates token bytes. This module knows nothing
//! about Hugging Face formats.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use fancy_regex::Regex;

use super::TokenizerError;

/// cl100k_base's pre-tokenization pattern, as in tiktoken's `openai_public.py`.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// cl100k_base's special tokens and their ids.
pub const CL100K_SPECIALS: &[(&str, u32)] = &[
    ("<|endoftext|>", 100257),
    ("<|fim_prefix|>", 100258),
    ("<|fim_middle|>", 100259),
    ("<|fim_suffix|>", 100260),
    ("<|endofprompt|>", 100276),
];

/// A byte-level BPE with merge priority given by token rank.
#[derive(Debug)]
pub struct TiktokenBpe {
    /// Token bytes to rank (= id).
    encoder: HashMap<Vec<u8>, u32>,
    /// Id to token bytes; `None` for ids that neither the rank file nor the
    /// special tokens use.
    decoder: Vec<Option<Vec<u8>>>,
    /// Special tokens, matched literally in the input before the regex runs.
    specials: Vec<(String, u32)>,
    pattern: Regex,
}

impl TiktokenBpe {
    /// Loads cl100k_base from its rank file (`cl100k_base.tiktoken`).
    pub fn cl100k_base(path: &Path) -> Result<Self, TokenizerError> {
        let specials = CL100K_SPECIALS
            .iter()
            .map(|&(s, id)| (s.to_string(), id))
            .collect();
        Self::from_file(path, CL100K_PATTERN, specials)
    }

    /// Loads a rank file with the given pre-tokenization regex and special tokens.
    pub fn from_file(
        path: &Path,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_rank_text(&text, pattern, specials).map_err(|e| match e {
            TokenizerError::BadRankFile { reason, .. } => TokenizerError::BadRankFile {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the contents of a rank file (see [`TiktokenBpe::from_file`]).
    pub fn from_rank_text(
        text: &str,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> Result<Self, TokenizerError> {
        let bad = |line: usize, reason: String| TokenizerError::BadRankFile {
            path: "<memory>".to_string(),
            reason: if line == 0 {
                reason
            } else {
                format!("line {line}: {reason}")
            },
        };
        let mut encoder = HashMap::new();
        let mut max_id = 0u32;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (token, rank) = line
                .split_once(' ')
                .ok_or_else(|| bad(i + 1, "expected `base64-token rank`".into()))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|e| bad(i + 1, format!("bad base64 `{token}`: {e}")))?;
            let rank: u32 = rank
                .trim()
                .parse()
                .map_err(|e| bad(i + 1, format!("bad rank `{rank}`: {e}")))?;
            if encoder.insert(bytes, rank).is_some() {
                return Err(bad(i + 1, format!("token `{token}` listed twice")));
            }
            max_id = max_id.max(rank);
        }
        if encoder.is_empty() {
            return Err(bad(0, "the rank file lists no tokens".into()));
        }
        // Every single byte must be a token, or some inputs could not be encoded.
        if let Some(b) = (0..=255u8).find(|b| !encoder.contains_key([*b].as_slice())) {
            return Err(bad(
                0,
                format!("byte 0x{b:02x} has no token; a byte-level BPE needs all 256"),
            ));
        }
        for (_, id) in &specials {
            max_id = max_id.max(*id);
        }
        let mut decoder: Vec<Option<Vec<u8>>> = vec![None; max_id as usize + 1];
        for (bytes, &rank) in &encoder {
            if decoder[rank as usize].is_some() {
                return Err(bad(0, format!("rank {rank} is used by two tokens")));
            }
            decoder[rank as usize] = Some(bytes.clone());
        }
        for (s, id) in &specials {
            if decoder[*id as usize].is_some() {
                return Err(bad(0, format!("special token {s} reuses id {id}")));
            }
            decoder[*id as usize] = Some(s.as_bytes().to_vec());
        }
        let pattern = Regex::new(pattern).map_err(|e| TokenizerError::BadPattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            encoder,
            decoder,
            specials,
            pattern,
        })
    }

    /// One past the largest id, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.specials
            .iter()
            .find(|(s, _)| s == token)
            .map(|&(_, id)| id)
    }

    /// The bytes of token `id` (special tokens as their UTF-8 text).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.decoder.get(id as usize)?.as_deref()
    }

    /// Encodes `text`, turning any special-token text in it into that token
    /// (as Hugging Face tokenizers do with added special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3);
        // The next occurrence of each special token at or after `pos`, kept
        // across iterations so the scan stays linear in the text length.
        let mut next: Vec<Option<usize>> = vec![None; self.specials.len()];
        let mut pos = 0;
        loop {
            let mut best: Option<(usize, usize)> = None; // (start, special index)
            for (k, (s, _)) in self.specials.iter().enumerate() {
                if next[k].is_none_or(|at| at < pos) {
                    next[k] = text[pos..].find(s.as_str()).map(|at| pos + at);
                }
                if let Some(at) = next[k] {
                    let better = match best {
                        None => true,
                        // Leftmost wins; at the same start, the longest.
                        Some((b, bk)) => at < b || (at == b && s.len() > self.specials[bk].0.len()),
                    };
                    if better {
                        best = Some((at, k));
                    }
                }
            }
            match best {
                Some((at, k)) => {
                    self.encode_ordinary_into(&text[pos..at], &mut out)?;
                    out.push(self.specials[k].1);
                    pos = at + self.specials[k].0.len();
                }
                None => {
                    self.encode_ordinary_into(&text[pos..], &mut out)?;
                    return Ok(out);
                }
            }
        }
    }

    /// Encodes `text` treating special-token text as ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        self.encode_ordinary_into(text, &mut out)?;
        Ok(out)
    }

    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        for m in self.pattern.find_iter(text) {
            let m = m.map_err(|e| TokenizerError::Encode(format!("pre-tokenizer regex: {e}")))?;
            self.bpe(m.as_str().as_bytes(), out);
        }
        Ok(())
    }

    /// Merges the bytes of one pre-token, lowest rank first.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(&id) = self.encoder.get(piece) {
            out.push(id);
            return;
        }
        // parts[i] = (start of part i, rank of merging part i with part i+1);
        // the last entry is the end sentinel.
        let rank_at = |parts: &[(usize, u32)], i: usize| -> u32 {
            if i + 2 < parts.len() {
                let span = &piece[parts[i].0..parts[i + 2].0];
                self.encoder.get(span).copied().unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        let mut parts: Vec<(usize, u32)> = (0..=piece.len()).map(|i| (i, u32::MAX)).collect();
        for i in 0..parts.len() {
            parts[i].1 = rank_at(&parts, i);
        }
        loop {
            // Leftmost lowest rank, as tiktoken picks it.
            let mut best = (u32::MAX, 0);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let i = best.1;
            parts.remove(i + 1);
            parts[i].1 = rank_at(&parts, i);
            if i > 0 {
                parts[i - 1].1 = rank_at(&parts, i - 1);
            }
        }
        for w in parts.windows(2) {
            // Every single byte is a token (checked at load), and every merge
            // result was looked up in the encoder, so this cannot miss.
            out.push(self.encoder[&piece[w[0].0..w[1].0]]);
        }
    }

    /// Concatenates the bytes of `ids`; ids without a token are skipped.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy rank file: all 256 bytes, then a few merges.
    fn toy() -> TiktokenBpe {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut lines: Vec<String> = (0..=255u8)
            .map(|b| format!("{} {}", b64(&[b]), b))
            .collect();
        for (i, t) in ["ab", "abc", "cd", "abcd", " a"].iter().enumerate() {
            lines.push(format!("{} {}", b64(t.as_bytes()), 256 + i));
        }
        TiktokenBpe::from_rank_text(
            &lines.join("\n"),
            CL100K_PATTERN,
            vec![("<|end|>".into(), 300)],
        )
        .unwrap()
    }

    #[test]
    fn merges_by_rank() {
        let t = toy();
        // "abcd": ab(256) first, then abc(257), then no "abc"+"d" = abcd? yes,
        // abcd(259) exists, so one token.
        assert_eq!(t.encode("abcd").unwrap(), vec![259]);
        // "abce": ab, abc, then e.
        assert_eq!(t.encode("abce").unwrap(), vec![257, b'e' as u32]);
        // "cdab": cd(258) and ab(256) both merge; "cdab" has no token.
        assert_eq!(t.encode("cdab").unwrap(), vec![258, 256]);
    }

    #[test]
    fn specials_are_matched_and_round_trip() {
        let t = toy();
        let ids = t.encode("ab<|end|>cd").unwrap();
        assert_eq!(ids, vec![256, 300, 258]);
        assert_eq!(t.decode_bytes(&ids), b"ab<|end|>cd");
        assert_eq!(t.encode_ordinary("<|end|>").unwrap().len(), 7);
        assert_eq!(t.vocab_size(), 301);
    }

    #[test]
    fn missing_byte_is_an_error() {
        let err = TiktokenBpe::from_rank_text("YQ== 0", CL100K_PATTERN, vec![]).unwrap_err();
        assert!(err.to_string().contains("byte 0x00 has no token"), "{err}");
    }

    #[test]
    fn bad_line_reports_its_number() {
        let err =
            TiktokenBpe::from_rank_text("YQ== 0\nnot-a-line", CL100K_PATTERN, vec![]).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
