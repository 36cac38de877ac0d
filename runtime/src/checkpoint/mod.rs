//! Checkpoint readers and writers: Hugging Face directories (config.json +
//! safetensors), GGUF files, conversion between them.
