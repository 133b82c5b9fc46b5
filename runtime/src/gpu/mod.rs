//! The wgpu side: a device context, the pipeline cache and the shader sources.
//!
//! Every WGSL kernel lives in `shaders/` at the repository root, one file per kernel family, and is
//! compiled into the binary with `include_str!`. Pipelines are created lazily and cached by
//! [`KernelKey`] (shader, entry point, override constants), so one pipeline serves every node that
//! uses the same kernel variant; shapes travel in a parameter buffer, never in the source.

mod cache;
mod params;
pub use cache::{PIPELINE_CACHE_ENV, PipelineCacheStatus, default_pipeline_cache_dir};
pub use params::{PARAMS_USAGE, Params, params_offset_alignment};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// Errors of the GPU layer.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found (wgpu looked for Vulkan, Metal and DX12 adapters; on Linux without a GPU install \
         Mesa's lavapipe: apt-get install mesa-vulkan-drivers): {0}"
    )]
    NoAdapter(String),
    #[error("could not open the GPU device on {adapter}: {reason}")]
    Device { adapter: String, reason: String },
    #[error("GPU validation error in {what}: {reason}")]
    Validation { what: String, reason: String },
    #[error("GPU buffer readback failed: {0}")]
    Readback(String),
    #[error("out of GPU memory while {0}")]
    OutOfMemory(String),
    #[error("{what} needs {bytes} bytes, more than the device's {limit_name} of {limit} bytes")]
    TooLarge { what: String, bytes: u64, limit: u64, limit_name: &'static str },
    #[error(
        "the GPU device was lost ({reason}); nothing more can run on it: open a new GpuContext and \
         rebuild the engines and sessions (a saved state can be loaded into them)"
    )]
    DeviceLost { reason: String },
    #[error("GPU error outside any error scope (reported by wgpu after the call that caused it): {0}")]
    Uncaptured(String),
    #[error("pipeline cache: {0}")]
    PipelineCache(String),
    #[error("the GPU self-test failed at {stage}: {detail}; this GPU's driver computes wrong results")]
    SelfTest { stage: String, detail: String },
    #[error("ACCLIMATE_LIMITS={0:?} is not a limits profile: use `downlevel` or `adapter` (or leave it unset)")]
    LimitsProfile(String),
}

/// Which limits a [`GpuContext`] asks its device for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LimitsProfile {
    /// The adapter's own limits (the default): large activations fit in one binding, and a desktop
    /// GPU's 8+ storage buffers per shader stage are available.
    #[default]
    Adapter,
    /// Exactly `wgpu::Limits::downlevel_defaults()`, what many phone GPUs offer (Adreno 5xx and
    /// others): 4 storage buffers per shader stage, 16,352 B of workgroup storage, 128 MiB per
    /// storage binding, 256 MiB per buffer. A limit the adapter does not reach (a weaker one than
    /// downlevel's) is lowered to the adapter's value instead, so the device can still be opened
    /// on it. Runs on a desktop GPU under these limits fail where a phone would.
    Downlevel,
}

impl LimitsProfile {
    /// The environment variable [`GpuContext::new`] reads: `downlevel` or `adapter`.
    pub const ENV: &'static str = "ACCLIMATE_LIMITS";

    /// The profile `ACCLIMATE_LIMITS` names (unset or empty: [`LimitsProfile::Adapter`]).
    pub fn from_env() -> Result<LimitsProfile, GpuError> {
        match std::env::var(Self::ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(LimitsProfile::Adapter),
        }
    }

    /// The limits to request from an adapter that offers `adapter`.
    pub fn limits(self, adapter: &wgpu::Limits) -> wgpu::Limits {
        match self {
            LimitsProfile::Adapter => adapter.clone(),
            LimitsProfile::Downlevel => wgpu::Limits::downlevel_defaults().or_worse_values_from(adapter),
        }
    }
}

impl std::str::FromStr for LimitsProfile {
    type Err = GpuError;

    fn from_str(s: &str) -> Result<LimitsProfile, GpuError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "adapter" | "default" => Ok(LimitsProfile::Adapter),
            "downlevel" => Ok(LimitsProfile::Downlevel),
            _ => Err(GpuError::LimitsProfile(s.to_string())),
        }
    }
}

/// One WGSL source file of `shaders/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Elementwise,
    Conv,
    Matmul,
    Pool,
    Reduce,
    Norm,
    Softmax,
    Layout,
    Loss,
    Optim,
    Select,
    Output,
    Preprocess,
    /// ROID; compiled after `optim.wgsl`, whose candidate functions its guard checks call.
    Roid,
    /// Method `auto`'s stream diagnostics.
    Diagnostics,
}

impl Shader {
    pub const ALL: [Shader; 15] = [
        Shader::Elementwise,
        Shader::Conv,
        Shader::Matmul,
        Shader::Pool,
        Shader::Reduce,
        Shader::Norm,
        Shader::Softmax,
        Shader::Layout,
        Shader::Loss,
        Shader::Optim,
        Shader::Select,
        Shader::Output,
        Shader::Preprocess,
        Shader::Roid,
        Shader::Diagnostics,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Shader::Elementwise => "elementwise.wgsl",
            Shader::Conv => "conv.wgsl",
            Shader::Matmul => "matmul.wgsl",
            Shader::Pool => "pool.wgsl",
            Shader::Reduce => "reduce.wgsl",
            Shader::Norm => "norm.wgsl",
            Shader::Softmax => "softmax.wgsl",
            Shader::Layout => "layout.wgsl",
            Shader::Loss => "loss.wgsl",
            Shader::Optim => "optim.wgsl",
            Shader::Select => "select.wgsl",
            Shader::Output => "output.wgsl",
            Shader::Preprocess => "preprocess.wgsl",
            Shader::Roid => "roid.wgsl",
            Shader::Diagnostics => "diagnostics.wgsl",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Shader::Elementwise => {
                concat!(
                    include_str!("../../../shaders/elementwise.wgsl"),
                    include_str!("../../../shaders/activation.wgsl")
                )
            }
            Shader::Conv => {
                concat!(include_str!("../../../shaders/conv.wgsl"), include_str!("../../../shaders/activation.wgsl"))
            }
            Shader::Matmul => {
                concat!(include_str!("../../../shaders/matmul.wgsl"), include_str!("../../../shaders/activation.wgsl"))
            }
            Shader::Pool => include_str!("../../../shaders/pool.wgsl"),
            Shader::Reduce => include_str!("../../../shaders/reduce.wgsl"),
            Shader::Norm => {
                concat!(include_str!("../../../shaders/norm.wgsl"), include_str!("../../../shaders/activation.wgsl"))
            }
            Shader::Softmax => include_str!("../../../shaders/softmax.wgsl"),
            Shader::Layout => include_str!("../../../shaders/layout.wgsl"),
            Shader::Loss => include_str!("../../../shaders/loss.wgsl"),
            Shader::Optim => include_str!("../../../shaders/optim.wgsl"),
            Shader::Select => include_str!("../../../shaders/select.wgsl"),
            Shader::Output => include_str!("../../../shaders/output.wgsl"),
            Shader::Preprocess => include_str!("../../../shaders/preprocess.wgsl"),
            Shader::Diagnostics => include_str!("../../../shaders/diagnostics.wgsl"),
            Shader::Roid => {
                concat!(include_str!("../../../shaders/optim.wgsl"), include_str!("../../../shaders/roid.wgsl"))
            }
        }
    }
}

/// A kernel variant: which entry point of which shader, with which pipeline-overridable constants.
///
/// Override values are integers (op codes, tile switches); anything that varies per node goes in
/// the [`Params`] block instead, so the number of pipelines stays small.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: Shader,
    pub entry: &'static str,
    pub overrides: Vec<(&'static str, i32)>,
}

impl KernelKey {
    pub fn new(shader: Shader, entry: &'static str) -> KernelKey {
        KernelKey { shader, entry, overrides: Vec::new() }
    }

    pub fn with(mut self, name: &'static str, value: i32) -> KernelKey {
        self.overrides.push((name, value));
        self
    }
}

/// The device, its queue and what we know about the adapter. Cheap to clone.
///
/// # Errors that wgpu reports later
///
/// wgpu reports device loss through a callback and errors outside an error scope through a
/// handler whose default panics. A context from [`GpuContext::new`] installs both: a lost device
/// or an uncaptured error is recorded and returned as [`GpuError::DeviceLost`] or
/// [`GpuError::Uncaptured`] by the next call that runs or reads back anything
/// ([`GpuContext::check`]). Acclimate's own buffer creation and submits are wrapped in error
/// scopes as well, so its errors reach the caller as values whichever handler is installed.
///
/// Cloning is cheap and shares the device, the queue and the compiled pipelines: open one
/// context per app and hand it to every engine, session and stream.
///
/// ```no_run
/// let ctx = acclimate::GpuContext::new()?; // WGPU_BACKEND / WGPU_ADAPTER_NAME pick the adapter
/// println!("running on {}", ctx.adapter_summary());
/// # Ok::<(), acclimate::Error>(())
/// ```
#[derive(Clone)]
pub struct GpuContext {
    /// The device everything is allocated on.
    pub device: wgpu::Device,
    /// The queue everything is submitted on.
    pub queue: wgpu::Queue,
    /// The adapter, when known (an app's own device comes without it unless
    /// [`GpuContext::with_adapter_info`] adds it).
    pub adapter_info: Option<wgpu::AdapterInfo>,
    inner: Arc<Inner>,
}

struct Inner {
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<KernelKey, wgpu::ComputePipeline>>,
    health: Arc<Health>,
    disk_cache: Mutex<Option<cache::DiskCache>>,
    /// Whether the self-test passed on this device (`[gpu] self_test` runs it once per context).
    self_tested: Mutex<bool>,
    /// [`GpuContext::set_cpu_kernels`]: 0 from the adapter's type, 1 on, 2 off.
    cpu_kernels: std::sync::atomic::AtomicU8,
}

/// What the device-lost callback and the uncaptured-error handler recorded.
#[derive(Default)]
struct Health {
    lost: Mutex<Option<String>>,
    /// The first uncaptured error not yet returned, and how many more came after it.
    uncaptured: Mutex<Option<(String, usize)>>,
}

impl Health {
    fn lose(&self, reason: String) {
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        lost.get_or_insert(reason);
    }

    fn uncaptured(&self, message: String) {
        let mut u = self.uncaptured.lock().unwrap_or_else(|e| e.into_inner());
        match u.as_mut() {
            Some((_, more)) => *more += 1,
            None => *u = Some((message, 0)),
        }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.adapter_summary()).finish()
    }
}

impl GpuContext {
    /// Opens the best adapter wgpu finds (honours `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`), asking for
    /// the adapter's own limits so large activations fit in one binding, or for
    /// `wgpu::Limits::downlevel_defaults()` when `ACCLIMATE_LIMITS=downlevel` (see
    /// [`LimitsProfile`]).
    pub fn new() -> crate::Result<GpuContext> {
        pollster::block_on(Self::new_async())
    }

    pub async fn new_async() -> crate::Result<GpuContext> {
        Self::with_limits_async(LimitsProfile::from_env()?).await
    }

    /// Like [`GpuContext::new`], with the limits chosen here rather than by `ACCLIMATE_LIMITS`:
    /// [`LimitsProfile::Downlevel`] checks on a desktop GPU that a model and its adaptation fit
    /// the limits of a phone GPU.
    ///
    /// ```no_run
    /// use acclimate::{GpuContext, LimitsProfile};
    /// let ctx = GpuContext::with_limits(LimitsProfile::Downlevel)?;
    /// assert_eq!(ctx.limits().max_storage_buffers_per_shader_stage, 4);
    /// # Ok::<(), acclimate::Error>(())
    /// ```
    pub fn with_limits(profile: LimitsProfile) -> crate::Result<GpuContext> {
        pollster::block_on(Self::with_limits_async(profile))
    }

    pub async fn with_limits_async(profile: LimitsProfile) -> crate::Result<GpuContext> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let power_preference = wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::HighPerformance);
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let limits = profile.limits(&adapter.limits());
        if profile == LimitsProfile::Downlevel {
            log::info!("limits: downlevel");
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("acclimate"),
                // Timestamp queries only for profiles (`plan::profile`); unused otherwise.
                required_features: adapter.features()
                    & (wgpu::Features::PIPELINE_CACHE | wgpu::Features::TIMESTAMP_QUERY),
                required_limits: limits,
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| GpuError::Device { adapter: info.name.clone(), reason: e.to_string() })?;
        let ctx = Self::from_device(device, queue).with_adapter_info(info);
        ctx.install_error_handlers();
        if let Some(dir) = cache::dir_from_env() {
            ctx.enable_pipeline_cache(&dir);
        }
        Ok(ctx)
    }

    /// Wraps an application's own device and queue (for example the one its renderer uses).
    /// Acclimate then allocates everything on that device and submits on that queue.
    ///
    /// The device's uncaptured-error handler and device-lost callback are left as the
    /// application set them (wgpu keeps one of each and cannot chain them). Acclimate's own
    /// buffer creation and submits run in error scopes, so their errors come back as values
    /// anyway. An application without handlers of its own calls
    /// [`GpuContext::install_error_handlers`]; one with its own forwards to
    /// [`GpuContext::report_device_lost`] and [`GpuContext::report_error`] from them, so that
    /// Acclimate's next call returns the error instead of touching a dead device.
    ///
    /// ```no_run
    /// # async fn open(adapter: acclimate::wgpu::Adapter) -> Result<(), Box<dyn std::error::Error>> {
    /// let (device, queue) = adapter.request_device(&Default::default()).await?;
    /// let ctx = acclimate::GpuContext::from_device(device, queue).with_adapter_info(adapter.get_info());
    /// ctx.install_error_handlers();
    /// # Ok(()) }
    /// ```
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> GpuContext {
        GpuContext {
            device,
            queue,
            adapter_info: None,
            inner: Arc::new(Inner {
                modules: Mutex::new(HashMap::new()),
                pipelines: Mutex::new(HashMap::new()),
                health: Arc::new(Health::default()),
                disk_cache: Mutex::new(None),
                self_tested: Mutex::new(false),
                cpu_kernels: std::sync::atomic::AtomicU8::new(0),
            }),
        }
    }

    /// Records the adapter the device came from (shown by [`GpuContext::adapter_summary`] and in
    /// logs and reports).
    pub fn with_adapter_info(mut self, info: wgpu::AdapterInfo) -> GpuContext {
        self.adapter_info = Some(info);
        self
    }

    /// Installs this context's uncaptured-error handler and device-lost callback on the device,
    /// replacing whatever was set (wgpu's default handler panics). Errors they receive are
    /// returned by the next call ([`GpuContext::check`]).
    pub fn install_error_handlers(&self) {
        let health = self.inner.health.clone();
        self.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| health.uncaptured(e.to_string())));
        let health = self.inner.health.clone();
        self.device.set_device_lost_callback(move |reason, message| {
            let why = match reason {
                wgpu::DeviceLostReason::Destroyed => "the device was destroyed".to_string(),
                wgpu::DeviceLostReason::Unknown => "the driver reported it lost".to_string(),
            };
            health.lose(if message.is_empty() { why } else { format!("{why}: {message}") });
        });
    }

    /// Records that the device was lost (for an application's own device-lost callback): every
    /// later call returns [`GpuError::DeviceLost`].
    pub fn report_device_lost(&self, reason: &str) {
        self.inner.health.lose(reason.to_string());
    }

    /// Records an error the application's handler received: the next call returns it as
    /// [`GpuError::Uncaptured`].
    pub fn report_error(&self, message: &str) {
        self.inner.health.uncaptured(message.to_string());
    }

    /// Whether the device was lost (as the installed callback or the application reported).
    pub fn is_lost(&self) -> bool {
        self.inner.health.lost.lock().map(|l| l.is_some()).unwrap_or(true)
    }

    /// The device's health: [`GpuError::DeviceLost`] once it was lost (every call after that),
    /// or the first uncaptured error since the last check (returned once).
    pub fn check(&self) -> Result<(), GpuError> {
        if let Some(reason) = self.inner.health.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(GpuError::DeviceLost { reason });
        }
        match self.inner.health.uncaptured.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some((message, 0)) => Err(GpuError::Uncaptured(message)),
            Some((message, more)) => Err(GpuError::Uncaptured(format!("{message} (and {more} more)"))),
            None => Ok(()),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes (on this thread) and returns
    /// its value, or the first error wgpu reported while it ran, described as `what`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        self.check()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let invalid = pollster::block_on(validation.pop());
        let out_of_memory = pollster::block_on(oom.pop());
        // A lost device turns every later call into a validation error; say what happened.
        self.check()?;
        if let Some(e) = out_of_memory {
            return Err(GpuError::OutOfMemory(format!("{what}: {e}")));
        }
        if let Some(e) = invalid {
            return Err(GpuError::Validation { what: what.to_string(), reason: e.to_string() });
        }
        Ok(value)
    }

    /// Checks that one buffer of `bytes` fits the device: `max_buffer_size`, and when it is bound
    /// whole as a storage buffer, `max_storage_buffer_binding_size`.
    pub fn check_buffer(&self, what: impl FnOnce() -> String, bytes: u64, storage: bool) -> Result<(), GpuError> {
        let limits = self.limits();
        let (limit, limit_name) = if storage && limits.max_storage_buffer_binding_size < limits.max_buffer_size {
            (limits.max_storage_buffer_binding_size, "max_storage_buffer_binding_size")
        } else {
            (limits.max_buffer_size, "max_buffer_size")
        };
        if bytes > limit {
            return Err(GpuError::TooLarge { what: what(), bytes, limit, limit_name });
        }
        Ok(())
    }

    /// A one-line description of the adapter: name, backend and device type.
    pub fn adapter_summary(&self) -> String {
        match &self.adapter_info {
            Some(info) => format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type),
            None => "the application's device (adapter not given)".to_string(),
        }
    }

    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// The compute pipeline for `key`, compiled on first use and cached for the context's lifetime.
    /// Whether kernels with a variant for CPU adapters run it ([`GpuContext::variant`]): by
    /// default when the adapter is known to be a CPU (lavapipe, SwiftShader, WARP).
    pub fn cpu_kernels(&self) -> bool {
        match self.inner.cpu_kernels.load(std::sync::atomic::Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.adapter_info.as_ref().is_some_and(|i| i.device_type == wgpu::DeviceType::Cpu),
        }
    }

    /// Forces the CPU variants on or off (`None`: from the adapter's type again), for every
    /// pipeline made afterwards through this context or its clones. Tests use it to run the
    /// GPU kernels on lavapipe; results are the same either way (same sums in the same order).
    pub fn set_cpu_kernels(&self, on: Option<bool>) {
        let v = match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.inner.cpu_kernels.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// The kernel that runs for `key` on this context: `key` itself, or its variant for CPU
    /// adapters ([`GpuContext::cpu_kernels`]), which takes the same bindings and grid and
    /// computes the same sums in the same order: `matmul_main` → `matmul_direct` (matmul.wgsl
    /// says why), and norm.wgsl's reductions with `SERIAL_TREE` (norm.wgsl's `tree`).
    pub fn variant(&self, key: &KernelKey) -> KernelKey {
        let mut k = key.clone();
        if !self.cpu_kernels() {
            return k;
        }
        match key.shader {
            Shader::Matmul if key.entry == "matmul_main" => k.entry = "matmul_direct",
            Shader::Conv if key.entry == "conv_gemm" => k.entry = "conv_gemm_direct",
            Shader::Conv if key.entry == "conv_gemm_dx" => k.entry = "conv_gemm_dx_direct",
            Shader::Norm => k.overrides.push(("SERIAL_TREE", 1)),
            _ => {}
        }
        k
    }

    pub fn pipeline(&self, key: &KernelKey) -> Result<wgpu::ComputePipeline, GpuError> {
        let key = &self.variant(key);
        if let Some(p) = self.inner.pipelines.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Ok(p.clone());
        }
        let module = self.module(key.shader)?;
        let constants: Vec<(&str, f64)> = key.overrides.iter().map(|&(n, v)| (n, v as f64)).collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.entry),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, ..Default::default() },
            cache: self.pipeline_cache_handle().as_ref(),
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                what: format!("pipeline {}::{} {:?}", key.shader.file_name(), key.entry, key.overrides),
                reason: err.to_string(),
            });
        }
        // Another thread (a step warmer, a second session on this context) may have compiled the
        // same kernel meanwhile. The first one stored stays the only one handed out: bind groups
        // made from an automatic layout only work with the pipeline that layout came from, and
        // callers cache bind groups across calls.
        let mut pipelines = self.inner.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pipelines.entry(key.clone()).or_insert(pipeline).clone())
    }

    fn module(&self, shader: Shader) -> Result<wgpu::ShaderModule, GpuError> {
        let mut modules = self.inner.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&shader) {
            return Ok(m.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.file_name()),
            source: wgpu::ShaderSource::Wgsl(shader.source().into()),
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                what: format!("shader {}", shader.file_name()),
                reason: err.to_string(),
            });
        }
        modules.insert(shader, module.clone());
        Ok(module)
    }

    /// The flag [`GpuContext::self_test`] sets once it passed, for configs that ask for it.
    pub(crate) fn self_tested(&self) -> &Mutex<bool> {
        &self.inner.self_tested
    }

    /// Number of pipelines compiled so far (they are shared across nodes and plans).
    pub fn pipeline_count(&self) -> usize {
        self.inner.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Splits `n` invocations of a 1-D kernel with `wg` threads per workgroup into a 2-D grid that
/// respects the 65 535 workgroups-per-dimension limit. Kernels recover the flat index as
/// `gid.x + gid.y * (num_workgroups.x * wg)`.
pub fn grid_1d(n: usize, wg: u32) -> [u32; 3] {
    let groups = n.div_ceil(wg as usize).max(1);
    if groups <= 65535 {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(65535);
        let x = groups.div_ceil(y);
        [x as u32, y as u32, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel file parses and validates with naga; needs no GPU.
    #[test]
    fn every_shader_validates_with_naga() {
        for shader in Shader::ALL {
            let src = shader.source();
            let module = naga::front::wgsl::parse_str(src)
                .unwrap_or_else(|e| panic!("{} does not parse:\n{}", shader.file_name(), e.emit_to_string(src)));
            let mut v =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty());
            if let Err(e) = v.validate(&module) {
                panic!("{} does not validate:\n{}", shader.file_name(), e.emit_to_string(src));
            }
        }
    }

    /// Every entry point fits `wgpu::Limits::downlevel_defaults()`, what many phone GPUs offer:
    /// at most 4 storage buffers statically used per entry point (Adreno 5xx and others have
    /// exactly 4: pipeline creation fails there otherwise), 16,352 B of workgroup storage, 256
    /// invocations per workgroup. Parameter blocks over the storage budget are uniform blocks,
    /// and every uniform block is copied into a workgroup variable of the same type before use:
    /// lavapipe recompiles kernels whose loops or branches read a uniform block directly each
    /// time a submit binds them (see `gpu::params`).
    #[test]
    fn every_entry_point_fits_downlevel_limits() {
        let downlevel = wgpu::Limits::downlevel_defaults();
        let limit = downlevel.max_storage_buffers_per_shader_stage as usize;
        let mut wrong = Vec::new();
        for shader in Shader::ALL {
            let src = shader.source();
            let module = naga::front::wgsl::parse_str(src).expect("parses (see the test above)");
            let info =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
                    .validate(&module)
                    .expect("validates (see the test above)");
            for (i, ep) in module.entry_points.iter().enumerate() {
                let uses = info.get_entry_point(i);
                let used: Vec<&naga::GlobalVariable> =
                    module.global_variables.iter().filter(|(h, _)| !uses[*h].is_empty()).map(|(_, v)| v).collect();
                let storage: std::collections::BTreeMap<_, _> = used
                    .iter()
                    .filter(|v| matches!(v.space, naga::AddressSpace::Storage { .. }))
                    .filter_map(|v| {
                        v.binding.as_ref().map(|b| ((b.group, b.binding), v.name.clone().unwrap_or_default()))
                    })
                    .collect();
                let name = format!("{}::{}", shader.file_name(), ep.name);
                if storage.len() > limit {
                    let names: Vec<&str> = storage.values().map(|n| n.as_str()).collect();
                    wrong.push(format!(
                        "{name} binds {} storage buffers ({}), over {limit}",
                        storage.len(),
                        names.join(", ")
                    ));
                }
                let mut layouter = naga::proc::Layouter::default();
                layouter.update(module.to_ctx()).expect("layouts of a validated module");
                let shared: u32 =
                    used.iter().filter(|v| v.space == naga::AddressSpace::WorkGroup).map(|v| layouter[v.ty].size).sum();
                if shared > downlevel.max_compute_workgroup_storage_size {
                    wrong.push(format!(
                        "{name} uses {shared} B of workgroup storage, over {}",
                        downlevel.max_compute_workgroup_storage_size
                    ));
                }
                let [x, y, z] = ep.workgroup_size;
                if x * y * z > downlevel.max_compute_invocations_per_workgroup
                    || x > downlevel.max_compute_workgroup_size_x
                    || y > downlevel.max_compute_workgroup_size_y
                    || z > downlevel.max_compute_workgroup_size_z
                {
                    wrong.push(format!("{name} has workgroups of {x}x{y}x{z}, over the downlevel limits"));
                }
                // A staged block read without its uniform source would be garbage (and leave
                // binding 0 out of the pipeline's layout).
                for w in used.iter().filter(|v| v.space == naga::AddressSpace::WorkGroup) {
                    let source = module
                        .global_variables
                        .iter()
                        .any(|(_, u)| u.space == naga::AddressSpace::Uniform && u.ty == w.ty);
                    if source && !used.iter().any(|u| u.space == naga::AddressSpace::Uniform && u.ty == w.ty) {
                        wrong.push(format!("{name} reads the staged block {:?} without loading it", w.name));
                    }
                }
                for u in used.iter().filter(|v| v.space == naga::AddressSpace::Uniform) {
                    let staged = used.iter().any(|v| v.space == naga::AddressSpace::WorkGroup && v.ty == u.ty);
                    if !staged {
                        wrong.push(format!(
                            "{name} reads {:?} from a uniform block without a workgroup copy of it",
                            u.name
                        ));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// `Shader::ALL` lists every file in `shaders/`, so no kernel escapes the validation above.
    #[test]
    fn every_shader_file_is_registered() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("shaders/ exists")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wgsl"))
            .collect();
        files.sort();
        let mut known: Vec<String> = Shader::ALL.iter().map(|s| s.file_name().to_string()).collect();
        // Appended to other files, never compiled alone (Shader::source).
        known.push("activation.wgsl".into());
        known.sort();
        assert_eq!(files, known);
    }

    #[test]
    fn grid_splits_beyond_the_dimension_limit() {
        assert_eq!(grid_1d(10, 256), [1, 1, 1]);
        let g = grid_1d(256 * 70000, 256);
        assert!(g[0] <= 65535 && g[1] > 1);
        assert!(g[0] as usize * g[1] as usize >= 70000);
    }
}
