//! caramba compiler
