//! Backend-generic tests: a test body is written once as `fn name<B: Backend>()` and
//! [`per_backend!`] instantiates it per backend, as `ndarray::name` and `flex::name`, or, in a build
//! with `--features wgpu`, as `wgpu::name` (the cubecl path; CI runs it on lavapipe, Mesa's software
//! Vulkan). `per_backend!(autodiff: ...)` wraps each backend in `Autodiff` for training tests;
//! names after `; cpu:` are instantiated on ndarray and flex only.

#[macro_export]
macro_rules! per_backend {
    (autodiff: $($test:ident),* $(; cpu: $($cpu:ident),*)? $(,)?) => {
        $crate::per_backend!(@each burn::backend::Autodiff<burn::backend::NdArray<f32>>,
            burn::backend::Autodiff<burn::backend::Flex>,
            burn::backend::Autodiff<burn::backend::Wgpu>; $($test),*; $($($cpu),*)?);
    };
    ($($test:ident),* $(; cpu: $($cpu:ident),*)? $(,)?) => {
        $crate::per_backend!(@each burn::backend::NdArray<f32>, burn::backend::Flex,
            burn::backend::Wgpu; $($test),*; $($($cpu),*)?);
    };
    (@each $nd:ty, $flex:ty, $wgpu:ty; $($test:ident),*; $($cpu:ident),*) => {
        // A `--features wgpu` build runs the wgpu instances only (`make test` ran the CPU ones);
        // not compiling the others keeps CI's wgpu build short. The `cpu:` list (tests too slow
        // for software Vulkan, e.g. repeated training runs) runs on ndarray and flex only.
        #[cfg(not(feature = "wgpu"))]
        mod ndarray {
            $(#[test] fn $test() { super::$test::<$nd>() })*
            $(#[test] fn $cpu() { super::$cpu::<$nd>() })*
        }
        #[cfg(not(feature = "wgpu"))]
        mod flex {
            $(#[test] fn $test() { super::$test::<$flex>() })*
            $(#[test] fn $cpu() { super::$cpu::<$flex>() })*
        }
        #[cfg(feature = "wgpu")]
        mod wgpu {
            $(#[test] fn $test() { super::$test::<$wgpu>() })*
        }
    };
}

/// A JSON array of numbers (fixtures, command output) as `f64`s.
#[allow(dead_code)]
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of numbers, found {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Asserts `got` equals `want` element by element within `tol` (absolute), through the one
/// comparison of the project ([`med_rlvr::compare::check_close`]): fails on NaN/Inf and on a
/// length mismatch. Returns the largest absolute error.
#[allow(dead_code)]
pub fn assert_close<G, W>(what: &str, got: &[G], want: &[W], tol: f64) -> f64
where
    G: Copy + Into<f64>,
    W: Copy + Into<f64>,
{
    match med_rlvr::compare::check_close(what, got, want, med_rlvr::compare::Tolerance::abs(tol)) {
        Ok(d) => d.max_abs,
        Err(e) => panic!("{e}"),
    }
}

/// Every float parameter of `m`, in visiting order, as f32.
#[allow(dead_code)]
pub fn weights<M: burn::module::Module<B>, B: burn::tensor::backend::Backend>(m: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            let d = p.val().into_data().convert::<f32>();
            self.0.extend(d.as_slice::<f32>().unwrap());
        }
    }
    let mut c = Collect(vec![]);
    m.visit(&mut c);
    c.0
}
