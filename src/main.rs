//! The `med-rlvr` binary: picks the Burn backend from the cargo features (cuda > wgpu > flex >
//! ndarray) and runs the command line.

use clap::Parser;
use med_rlvr::cli::{self, Cli};

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

fn main() {
    let cli = Cli::parse();
    let device = <Inner as burn::tensor::backend::BackendTypes>::Device::default();
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if cli.needs_device() {
        if let Err(msg) = check_device(&device) {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    }
    if let Err(e) = cli::run::<Backend>(cli, device) {
        eprintln!("error: {e:#}");
        std::process::exit(med_rlvr::exit::status(&e));
    }
}
