//! The model folder's `tokenizer.json`, through the `tokenizers` crate. No special tokens are
//! added when encoding (the prompt template is plain text; Qwen2.5 base has no BOS).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Qwen2.5's end-of-document token; base models end a reply with it.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// A loaded tokenizer plus the ids the sampler needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(anyhow!(
                "{}: tokenizer.json not found in the model folder",
                path.display()
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self { inner, path })
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens (such as `<|endoftext|>`) are left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Text of `ids` with special tokens kept (used to look for stop strings).
    pub fn decode_raw(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The default stop token: `<|endoftext|>` (151643 in Qwen2.5).
    pub fn eos_id(&self) -> Result<u32> {
        self.token_id(ENDOFTEXT)
            .with_context(|| format!("{}: has no {ENDOFTEXT} token", self.path.display()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A model folder's geometry (`config.json`) and tokenizer, refused together when the
    /// tokenizer has ids the model has no embedding row for (they would index past the
    /// embedding).
    pub fn for_model(dir: &Path) -> Result<(qwen2_burn::Qwen2Config, Self)> {
        let config = qwen2_burn::Qwen2Config::from_dir(dir)?;
        let tok = Self::from_dir(dir)?;
        tok.check_fits(config.vocab_size)?;
        Ok((config, tok))
    }

    fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let top = self.inner.get_vocab(true).into_values().max().unwrap_or(0) as usize;
        if top >= vocab_size {
            bail!(
                "{}: token ids go up to {top} but the model's config.json has vocab_size \
                 {vocab_size}: the tokenizer and the weights come from different models",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Refuses `tokens` positions beyond the model's `max_position_embeddings`, naming `what` (the
/// prompt and the reply budget that need them) and the setting to lower.
pub fn check_context(max_position_embeddings: usize, tokens: usize, what: &str) -> Result<()> {
    if tokens > max_position_embeddings {
        bail!(
            "{what} need {tokens} positions but the model's max_position_embeddings is \
             {max_position_embeddings}: shorten the prompt or lower the number of new tokens"
        );
    }
    Ok(())
}
