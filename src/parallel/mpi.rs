//! Data parallelism across processes and nodes over MPI (`--features mpi`, `train --mpi` under
//! `mpirun`/`srun`): one replica of the trainer per process, rank and size from `MPI_COMM_WORLD`,
//! the device from the node-local rank (`MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`).
//!
//! Once [`init`] has run, every collective of [`World`] goes through MPI's all-reduce on host
//! buffers, so it works with every backend: the batch statistics as f64 (exact sums, where the
//! threads' collective sends f32), and the gradients as f32, read back from the device in the
//! fixed parameter order of [`super::stable_param_ids`], copied into one host buffer and
//! all-reduced in buckets of at most [`BUCKET`] values. The trainer's phases call `World` and do
//! not know which transport is underneath.
//!
//! Faults: no rank waits forever. MPI's default error handler ends the job when a peer's
//! connection breaks, and the launcher (`mpirun`, `srun`) ends it when a rank dies; a rank that
//! fails calls `MPI_Abort` (see [`end`]); and a watchdog thread aborts the job when one
//! collective has waited longer than the timeout (`train --mpi-timeout`), e.g. on a hung rank.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::World;

/// The most values one gradient all-reduce call carries (64 MiB of f32): few, large calls, well
/// below MPI's `int` count limit.
pub const BUCKET: usize = 1 << 24;

/// This process's place in the MPI world, and what its collectives have carried.
pub struct Mpi {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this node (picks the device) and their number.
    pub local_rank: usize,
    pub local_size: usize,
    /// Nodes in the job (processes with node-local rank 0).
    pub nodes: usize,
    /// A collective that waits longer aborts the job; `None`: no limit.
    pub timeout: Option<Duration>,
    threading: Threading,
    start: Instant,
    /// Milliseconds since `start` (plus one) when the collective under way began; 0: none.
    since: AtomicU64,
    what: Mutex<&'static str>,
    calls: AtomicU64,
    bytes: AtomicU64,
    grad_calls: AtomicU64,
    grad_bytes: AtomicU64,
}

static STATE: OnceLock<Mpi> = OnceLock::new();
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);
/// Shapes of the parameters numbered by `stable_param_ids`, by the numbering's base (recorded
/// once MPI is up: the order in which gradients are all-reduced).
static LAYOUTS: Mutex<BTreeMap<u64, Vec<Vec<usize>>>> = Mutex::new(BTreeMap::new());
/// The stop flag of `train` that SIGUSR1 sets (see [`stop_on_sigusr1`]).
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The MPI world of this process, once [`init`] has run.
pub fn active() -> Option<&'static Mpi> {
    STATE.get()
}

/// Initialises MPI (`MPI_Init_thread`, asking for `MPI_THREAD_MULTIPLE` so that the watchdog may
/// abort while the main thread waits in a collective) and makes every collective of [`World`] go
/// through it. Returns this process's replica. `timeout`: see [`Mpi::timeout`].
pub fn init(timeout: Option<Duration>) -> Result<World> {
    let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| anyhow!("--mpi: MPI is already initialised in this process"))?;
    let world = SimpleCommunicator::world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let local = world.split_shared(rank as i32);
    let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
    drop(local);
    let mut nodes = [0u64];
    world.all_reduce_into(
        &[(local_rank == 0) as u64][..],
        &mut nodes[..],
        SystemOperation::sum(),
    );
    *UNIVERSE.lock().expect("MPI universe lock") = Some(universe);
    let state = Mpi {
        rank,
        size,
        local_rank,
        local_size,
        nodes: nodes[0] as usize,
        timeout,
        threading,
        start: Instant::now(),
        since: AtomicU64::new(0),
        what: Mutex::new(""),
        calls: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        grad_calls: AtomicU64::new(0),
        grad_bytes: AtomicU64::new(0),
    };
    if STATE.set(state).is_err() {
        bail!("--mpi: MPI is already initialised in this process");
    }
    if let Some(limit) = timeout {
        std::thread::Builder::new()
            .name("mpi-watchdog".into())
            .spawn(move || watchdog(limit))?;
    }
    Ok(World { rank, size })
}

/// Aborts the job when one collective has waited longer than `limit`.
fn watchdog(limit: Duration) {
    let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let Some(m) = active() else { return };
    loop {
        std::thread::sleep(tick);
        let since = m.since.load(Ordering::SeqCst);
        if since == 0 {
            continue;
        }
        let waited = (m.start.elapsed().as_millis() as u64).saturating_sub(since - 1);
        if waited > limit.as_millis() as u64 {
            let what = *m.what.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "error: MPI rank {} of {}: {what} waited {:.0} s for the other ranks (limit \
                 --mpi-timeout {}): a rank is hung, stopped or unreachable; aborting the job",
                m.rank,
                m.size,
                waited as f64 / 1e3,
                limit.as_secs_f64()
            );
            abort(1);
        }
    }
}

/// Ends the whole job with `code` (`MPI_Abort` on `MPI_COMM_WORLD`; the launcher kills every
/// rank). From another thread than the main one only where MPI granted `MPI_THREAD_MULTIPLE`;
/// otherwise this process exits, which the launcher treats the same way.
pub fn abort(code: i32) -> ! {
    let multiple = active().is_some_and(|m| m.threading == Threading::Multiple);
    if multiple || std::thread::current().name() == Some("main") {
        SimpleCommunicator::world().abort(code)
    }
    std::process::exit(code)
}

/// How a process of an MPI job ends: status 0 finalises MPI; any other status aborts the job
/// (the other ranks may be waiting in a collective for this one), except in a world of one.
/// Nothing to do without MPI.
pub fn end(code: i32) {
    let Some(m) = active() else { return };
    m.since.store(0, Ordering::SeqCst);
    if code != 0 && m.size > 1 {
        abort(code);
    }
    // Dropping the universe calls MPI_Finalize.
    drop(UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// Makes SIGUSR1 set `flag` (as SIGINT/SIGTERM do for one process): `mpirun` forwards SIGUSR1 to
/// every rank, whereas it follows SIGINT/SIGTERM with SIGKILL after a second.
pub fn stop_on_sigusr1(flag: Arc<AtomicBool>) -> Result<()> {
    extern "C" fn on_usr1(_: libc::c_int) {
        if let Some(f) = STOP.get() {
            f.store(true, Ordering::SeqCst);
        }
    }
    STOP.set(flag)
        .map_err(|_| anyhow!("the SIGUSR1 handler is already installed"))?;
    // SAFETY: the handler only loads an initialised OnceLock and stores to an atomic, both
    // async-signal-safe.
    let previous =
        unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        bail!("cannot install the SIGUSR1 handler");
    }
    Ok(())
}

/// Records the parameter shapes of a module numbered from `base` (see `stable_param_ids`).
pub(super) fn record_layout(base: u64, shapes: Vec<Vec<usize>>) {
    if active().is_some() {
        LAYOUTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(base, shapes);
    }
}

/// Marks a collective as under way for the watchdog while it lives.
struct Waiting<'a>(&'a Mpi);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::SeqCst);
    }
}

/// A gradient read back to the host, and where it goes back to.
struct Taken<B: Backend> {
    id: ParamId,
    dims: usize,
    shape: Vec<usize>,
    device: B::Device,
    dtype: DType,
    values: Vec<f32>,
}

impl Mpi {
    fn waiting(&self, what: &'static str) -> Waiting<'_> {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        let now = self.start.elapsed().as_millis() as u64;
        self.since.store(now + 1, Ordering::SeqCst);
        Waiting(self)
    }

    /// Writes `message` (an error that ends this rank) to stderr in one write, so that the ranks'
    /// lines do not interleave. The other ranks than 0 wait 2 s first: an error every rank meets
    /// (a bad setting, a missing file) is then told once, by rank 0, whose abort ends them; an
    /// error of their own is told 2 s later.
    pub fn report(&self, message: &str) {
        use std::io::Write;
        if self.rank != 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        let _ = std::io::stderr()
            .lock()
            .write_all(format!("{message}\n").as_bytes());
    }

    /// Rank 0's closing line: the job's shape and what this rank's all-reduces carried per step
    /// over `steps` steps that took `took`.
    pub fn summary(&self, steps: usize, took: Duration) -> String {
        let t = self.traffic();
        let per = steps.max(1) as f64;
        format!(
            "mpi: {} ranks on {} node(s), {steps} steps in {:.1} s: {} all-reduce calls, {:.3} MB \
             per rank per step ({:.3} MB of gradients in {:.1} calls)",
            self.size,
            self.nodes,
            took.as_secs_f64(),
            t.calls,
            t.bytes as f64 / per / 1e6,
            t.grad_bytes as f64 / per / 1e6,
            t.grad_calls as f64 / per
        )
    }

    /// All-reduce calls and the bytes this rank put into them since [`init`]: everything, and
    /// the gradients alone.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            calls: self.calls.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            grad_calls: self.grad_calls.load(Ordering::SeqCst),
            grad_bytes: self.grad_bytes.load(Ordering::SeqCst),
        }
    }

    fn count(&self, bytes: usize, grads: bool) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(bytes as u64, Ordering::SeqCst);
        if grads {
            self.grad_calls.fetch_add(1, Ordering::SeqCst);
            self.grad_bytes.fetch_add(bytes as u64, Ordering::SeqCst);
        }
    }

    /// Element-wise sum of `xs` over the ranks, in f64.
    pub fn sum(&self, xs: &[f64], what: &'static str) -> Vec<f64> {
        let mut out = vec![0.0; xs.len()];
        let _w = self.waiting(what);
        SimpleCommunicator::world().all_reduce_into(xs, &mut out[..], SystemOperation::sum());
        self.count(std::mem::size_of_val(xs), false);
        out
    }

    /// Sums `values` over the ranks in place, in calls of at most [`BUCKET`] values.
    fn sum_f32(&self, values: &mut [f32]) {
        let world = SimpleCommunicator::world();
        let mut out = vec![0f32; values.len().min(BUCKET)];
        for chunk in values.chunks_mut(BUCKET) {
            let out = &mut out[..chunk.len()];
            let _w = self.waiting("the gradient all-reduce");
            world.all_reduce_into(&chunk[..], out, SystemOperation::sum());
            chunk.copy_from_slice(out);
            self.count(std::mem::size_of_val(chunk), true);
        }
    }

    /// Rank 0's `bytes`, on every rank (the others' argument is ignored).
    pub fn share(&self, bytes: &[u8]) -> Vec<u8> {
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        let _w = self.waiting("a broadcast from rank 0");
        let mut len = [bytes.len() as u64];
        root.broadcast_into(&mut len[..]);
        let mut buf = match self.rank {
            0 => bytes.to_vec(),
            _ => vec![0u8; len[0] as usize],
        };
        root.broadcast_into(&mut buf[..]);
        buf
    }

    /// Sums the gradients over the ranks: the parameters of every module numbered by
    /// `stable_param_ids`, in id order, checked to have a gradient on all ranks or on none, read
    /// into one f32 host buffer, all-reduced in buckets, written back with their dtype and device.
    pub fn sum_grads<B: Backend>(&self, mut grads: GradientsParams) -> Result<GradientsParams> {
        let layout: Vec<(ParamId, Vec<usize>)> = LAYOUTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(&base, shapes)| {
                shapes
                    .iter()
                    .enumerate()
                    .map(move |(k, s)| (ParamId::from(base + k as u64), s.clone()))
            })
            .collect();
        let held = grads.len();
        let mut taken: Vec<Taken<B>> = Vec::new();
        let mut present = vec![0.0; layout.len()];
        for (i, (id, shape)) in layout.iter().enumerate() {
            if let Some(t) = take::<B>(&mut grads, *id, shape.clone())? {
                present[i] = 1.0;
                taken.push(t);
            }
        }
        if taken.len() != held {
            bail!(
                "MPI rank {}: {} of {held} gradients belong to parameters that stable_param_ids \
                 did not number; they cannot be paired across ranks",
                self.rank,
                held - taken.len()
            );
        }
        let on = self.sum(&present, "the gradient layout check");
        if let Some(i) = on.iter().position(|&c| c != 0.0 && c != self.size as f64) {
            bail!(
                "MPI rank {}: parameter {:?} has a gradient on {} of {} ranks (every rank must \
                 train the same parameters)",
                self.rank,
                layout[i].0,
                on[i],
                self.size
            );
        }
        let mut buf: Vec<f32> = Vec::with_capacity(taken.iter().map(|t| t.values.len()).sum());
        for t in &mut taken {
            buf.append(&mut t.values);
        }
        self.sum_f32(&mut buf);
        let mut at = 0;
        for t in taken {
            let n: usize = t.shape.iter().product();
            let data = TensorData::new(buf[at..at + n].to_vec(), t.shape.clone());
            at += n;
            put::<B>(&mut grads, t, data)?;
        }
        Ok(grads)
    }
}

/// All-reduce calls and bytes (see [`Mpi::traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub calls: u64,
    pub bytes: u64,
    pub grad_calls: u64,
    pub grad_bytes: u64,
}

/// Removes parameter `id`'s gradient (of `shape`) from `grads`, read back as f32.
fn take<B: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    shape: Vec<usize>,
) -> Result<Option<Taken<B>>> {
    macro_rules! read {
        ($d:literal) => {
            grads.remove::<B, $d>(id).map(|t| {
                let (device, dtype) = (t.device(), t.dtype());
                let got = t.shape().to_vec();
                (device, dtype, got, t.into_data())
            })
        };
    }
    let dims = shape.len();
    let read = match dims {
        1 => read!(1),
        2 => read!(2),
        3 => read!(3),
        4 => read!(4),
        5 => read!(5),
        6 => read!(6),
        d => bail!("parameter {id:?}: {d} dimensions; gradients of up to 6 are all-reduced"),
    };
    let Some((device, dtype, got, data)) = read else {
        return Ok(None);
    };
    if got != shape {
        bail!("parameter {id:?}: gradient of shape {got:?} where the parameter has {shape:?}");
    }
    let values = data
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow!("parameter {id:?}: reading the gradient: {e:?}"))?;
    Ok(Some(Taken {
        id,
        dims,
        shape,
        device,
        dtype,
        values,
    }))
}

/// Registers `data` as the gradient `t` was taken from, with its dtype and device.
fn put<B: Backend>(grads: &mut GradientsParams, t: Taken<B>, data: TensorData) -> Result<()> {
    macro_rules! write {
        ($d:literal) => {
            grads.register::<B, $d>(t.id, Tensor::from_data(data, (&t.device, t.dtype)))
        };
    }
    match t.dims {
        1 => write!(1),
        2 => write!(2),
        3 => write!(3),
        4 => write!(4),
        5 => write!(5),
        6 => write!(6),
        d => bail!("parameter {:?}: {d} dimensions", t.id),
    }
    Ok(())
}
