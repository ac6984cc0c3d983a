//! Backend-generic tests: a test body is written once as `fn name<B: Backend>()` and
//! [`per_backend!`] instantiates it per backend, as `ndarray::name`, `flex::name` and, in a build
//! with `--features wgpu`, `wgpu::name` (the cubecl path; CI runs it on lavapipe, Mesa's software
//! Vulkan). `per_backend!(autodiff: ...)` wraps each backend in `Autodiff` for training tests.

#[macro_export]
macro_rules! per_backend {
    (autodiff: $($test:ident),* $(,)?) => {
        $crate::per_backend!(@each burn::backend::Autodiff<burn::backend::NdArray<f32>>,
            burn::backend::Autodiff<burn::backend::Flex>,
            burn::backend::Autodiff<burn::backend::Wgpu>; $($test),*);
    };
    ($($test:ident),* $(,)?) => {
        $crate::per_backend!(@each burn::backend::NdArray<f32>, burn::backend::Flex,
            burn::backend::Wgpu; $($test),*);
    };
    (@each $nd:ty, $flex:ty, $wgpu:ty; $($test:ident),*) => {
        mod ndarray {
            $(#[test] fn $test() { super::$test::<$nd>() })*
        }
        mod flex {
            $(#[test] fn $test() { super::$test::<$flex>() })*
        }
        #[cfg(feature = "wgpu")]
        mod wgpu {
            $(#[test] fn $test() { super::$test::<$wgpu>() })*
        }
    };
}
