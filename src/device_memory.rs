//! Running out of device memory as an error, not a panic.
//!
//! CubeCL 0.10 cannot report a failed allocation to its caller: its device
//! thread unwraps the allocation's result and panics ("can't allocate
//! buffer of size: N"), and every later call into the dead thread panics
//! again. The command line installs [`install_panic_hook`], which turns the
//! first such panic into one error line naming the size that failed and
//! what to change, and exits with status 1 (without the destructors that
//! would wait on the dead device). Checkpoints and artifacts are
//! written atomically (a temporary file, then a rename), so exiting from
//! the hook leaves no half-written file behind. Every other panic keeps
//! the default report: it is a bug.

use std::panic;

/// The size of the allocation that failed, when `message` is CubeCL's
/// report of a failed device allocation.
pub fn failed_allocation(message: &str) -> Option<u64> {
    let rest = message.split("can't allocate buffer of size: ").nth(1)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The error printed for a failed allocation of `bytes`.
pub fn out_of_memory_message(bytes: u64) -> String {
    format!(
        "error: the device ran out of memory (an allocation of {:.2} GiB failed)\n  \
         = help: use a smaller batch or shorter sequences; in a training run, lower \
         `batch_size` (or `block_size`) and raise `gradient_accumulation_steps` to \
         keep the tokens per optimizer step, or set `activation_checkpointing: true` \
         (each layer's activations recomputed in the backward)",
        bytes as f64 / (1u64 << 30) as f64
    )
}

/// Installs the panic hook described in the module's documentation.
pub fn install_panic_hook() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        match failed_allocation(message) {
            Some(bytes) => {
                eprintln!("{}", out_of_memory_message(bytes));
                exit_now(1);
            }
            None => default(info),
        }
    }));
}

/// Exits with `code` without running destructors. `std::process::exit`
/// runs the calling thread's thread-local destructors, and on wgpu one of
/// them drops the device, whose queue waits for the last submission: after
/// a failed allocation that wait can time out and panic inside this hook,
/// which aborts (seen on lavapipe). Standard output is flushed first;
/// standard error is unbuffered.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    // SAFETY: `_exit` ends the process at once; nothing runs after it.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubecl_allocation_failures_are_recognized() {
        // The text CubeCL 0.10's CUDA server panics with (seen on an H100,
        // the 1B shape at batch 16).
        let msg = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 1328398336";
        assert_eq!(failed_allocation(msg), Some(1_328_398_336));
        assert_eq!(failed_allocation("index out of bounds"), None);
        assert_eq!(failed_allocation("can't allocate buffer of size: "), None);
        let text = out_of_memory_message(1_328_398_336);
        assert!(text.contains("1.24 GiB"), "{text}");
        assert!(text.contains("gradient_accumulation_steps"), "{text}");
        assert!(text.contains("activation_checkpointing"), "{text}");
    }
}
