//! The `med-rlvr` binary: picks the Burn backend from the cargo features (cuda > wgpu > flex >
//! ndarray) and runs the command line.

use clap::Parser;
mod app;

use app::cli::{self, Cli};

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Inner = burn::backend::Wgpu;
#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
type Inner = burn::backend::Flex;
#[cfg(all(
    feature = "ndarray",
    not(any(feature = "cuda", feature = "wgpu", feature = "flex"))
))]
type Inner = burn::backend::NdArray<f32>;

type Backend = burn::backend::Autodiff<Inner>;

/// GPU backends panic deep inside the runtime when no device or driver is present; turn that into
/// one clear message.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn check_device(
    device: &<Inner as burn::tensor::backend::BackendTypes>::Device,
) -> Result<(), String> {
    use burn::tensor::Tensor;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        Tensor::<Inner, 1>::zeros([1], device).into_data();
    });
    std::panic::set_hook(hook);
    probe.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let first = msg.lines().next().unwrap_or("");
        // The runtime's own words, unless they are only an unwrap of an internal channel error.
        let detail = if first.is_empty() || first.starts_with("called `") {
            String::new()
        } else {
            format!(" ({first})")
        };
        format!(
            "this binary was built with --features {} but no usable GPU was found{detail}; \
             run on a machine with a GPU and driver, or build without that feature for the CPU",
            if cfg!(feature = "cuda") {
                "cuda"
            } else {
                "wgpu"
            }
        )
    })
}

/// cubecl persists each kernel's autotune choice under the device's index only, not the adapter or
/// its plane (subgroup) width, so a choice made under one adapter is replayed under another where
/// the kernel cannot launch (a panic deep in the runtime; `benches/upstream-cubecl-autotune.md`).
/// On wgpu, where the adapter behind index 0 varies most (lavapipe's width follows the CPU and
/// `LP_NATIVE_VECTOR_WIDTH`), this binary keeps autotune results for its own lifetime only, in a
/// private folder that [`exit`] removes.
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
static AUTOTUNE_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
fn private_autotune_cache() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    let dir = std::env::temp_dir().join(format!("med-rlvr-autotune-{}", std::process::id()));
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.autotune.cache = CacheConfig::File(dir.clone());
    CubeClRuntimeConfig::set(config);
    let _ = AUTOTUNE_DIR.set(dir);
}

/// Ends the process with `code`, removing the private autotune folder of a wgpu build first. In
/// an MPI job (`train --mpi`): finalises MPI on success, and aborts the whole job otherwise (the
/// other ranks may be waiting for this one).
fn exit(code: i32) -> ! {
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    if let Some(dir) = AUTOTUNE_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
    #[cfg(feature = "mpi")]
    med_rlvr::parallel::mpi::end(code);
    std::process::exit(code)
}

fn main() {
    app::allocator::keep_freed_memory();
    let cli = Cli::parse();
    if !cli.main_thread_outside_pool() {
        app::threads::main_thread_computes();
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    private_autotune_cache();
    let device = <Inner as burn::tensor::backend::BackendTypes>::Device::default();
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if cli.needs_device() {
        if let Err(msg) = check_device(&device) {
            eprintln!("error: {msg}");
            exit(2);
        }
    }
    if let Err(e) = cli::run::<Backend>(cli, device) {
        #[cfg(feature = "mpi")]
        if let Some(m) = med_rlvr::parallel::mpi::active().filter(|m| m.size > 1) {
            m.report(&format!(
                "error on MPI rank {} of {}: {e:#}",
                m.rank, m.size
            ));
            exit(med_rlvr::exit::status(&e));
        }
        eprintln!("error: {e:#}");
        exit(med_rlvr::exit::status(&e));
    }
    exit(0)
}
