//! Post-hoc EMA (Karras et al. 2024, Section 3.2 and Algorithm 3): any power-function EMA
//! profile is reconstructed as a linear combination of snapshots saved with other profiles.
//!
//! [`solve_coefficients`] finds the combination (closed-form inner products of profiles, a
//! linear solve, columns normalised to sum 1); [`reconstruct`](fn@reconstruct) streams once
//! over memory-mapped snapshot files and accumulates every requested output at the same time.
//!
//! - `solve`: the least-squares coefficients.
//! - `reconstruct`: the streaming pass, batch by batch; `plan` lays out its work (which
//!   tensors are averaged, where each lies in every input and output), `combine` computes one
//!   work item, `pages` releases the input pages a finished batch has read.
//! - `accumulate`: the weighted-sum kernel; `convert`: float16/bfloat16/float32 conversion.

/// `$vis fn $name(...) $body`, compiled twice from the same source: for x86 CPUs with the listed
/// features (8-lane loops), used where the CPU has them, and portably. Same source, same
/// arithmetic, so the same results.
macro_rules! multiversioned {
    (
        [$($feature:tt),+] $(#[$doc:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block
    ) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            $(#[target_feature(enable = $feature)])+
            fn fast($($arg: $ty),*) {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $(std::arch::is_x86_feature_detected!($feature))&&+ {
                // SAFETY: the CPU has every feature `fast` is compiled for, checked just above.
                return unsafe { fast($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}

mod accumulate;
mod combine;
mod convert;
mod pages;
mod plan;
mod reconstruct;
mod solve;

pub use reconstruct::{reconstruct, Output, MAX_OUTPUTS};
pub use solve::{solve_coefficients, MAX_PROFILES, MAX_SNAPSHOTS};

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; this crate assumes a little-endian host");
