//! CUDA, loaded at run time: one build runs on machines with and without a GPU, on a
//! Jetson (CUDA 12.6, sm_87) and on datacenter cards (CUDA 13, sm_90).
//!
//! - The driver (`libcuda.so.1`) and NVRTC (`libnvrtc.so.13`, `.12`, or the file named
//!   by `EDGELM_NVRTC`) are opened with `dlopen`; nothing links against CUDA, so the
//!   wheel builds and imports anywhere. A machine without them gets `Error::Cuda`
//!   saying what is missing, and the caller falls back to the CPU.
//! - The kernels are CUDA C (`kernels.cu`, in this folder), compiled by NVRTC for the
//!   GPU found (`--gpu-architecture=sm_XY`, real machine code, so Hopper and Orin get their own
//!   instructions) and cached on disk under `$EDGELM_CUDA_CACHE` or
//!   `~/.cache/edgelm/cuda`, keyed by a hash of the source, the options and the NVRTC
//!   version. NVRTC ships none of the toolkit's headers, so the source includes none:
//!   f16 conversions are written as PTX `cvt`.
//! - Only the driver API is used (`cu*`): contexts, modules, launches, memory. Device
//!   memory is plain `cuMemAlloc` (never managed memory).
//!
//! Everything here is `unsafe` FFI behind safe wrappers that check sizes; each unsafe
//! block says why it holds.

pub mod model;

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

/// The kernels' source, compiled at run time.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;
type CuModule = *mut c_void;
type CuFunction = *mut c_void;
type CuStream = *mut c_void;
type CuDevicePtr = u64;
type CuGraph = *mut c_void;
type CuGraphExec = *mut c_void;
/// cuStreamBeginCapture mode: only this thread's unsafe calls are refused (other
/// models' executors keep running on their threads).
const CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: c_int = 1;
type NvrtcResult = c_int;
type NvrtcProgram = *mut c_void;

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
const CU_DEVICE_ATTRIBUTE_INTEGRATED: c_int = 18;
const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
/// CUlaunchAttributeID: the launch may overlap the previous kernel in the stream, which
/// it waits for with `griddepcontrol.wait` (GRID_DEP_WAIT in kernels.cu).
const CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: c_uint = 6;

/// CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union.
#[repr(C)]
struct CuLaunchAttribute {
    id: c_uint,
    pad: [u8; 4],
    value: [u64; 8],
}

/// CUlaunchConfig (cuda.h).
#[repr(C)]
struct CuLaunchConfig {
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared: c_uint,
    stream: CuStream,
    attrs: *mut CuLaunchAttribute,
    num_attrs: c_uint,
}

fn cuda_err(msg: impl Into<String>) -> Error {
    Error::Cuda(msg.into())
}

/// A shared library's function, looked up once.
macro_rules! sym {
    ($lib:expr, $name:literal) => {{
        // SAFETY: the symbol's type is the C prototype from the CUDA headers, written
        // out where the function table is declared.
        let s = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
            .map_err(|e| cuda_err(format!("{} lacks {}: {e}", stringify!($lib), $name)))?;
        *s
    }};
}

struct Driver {
    _lib: libloading::Library,
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    func_set_attribute: unsafe extern "C" fn(CuFunction, c_int, c_int) -> CuResult,
    #[allow(clippy::type_complexity)]
    launch_kernel: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CuStream,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    /// cuLaunchKernelEx (CUDA 12.0+), for programmatic dependent launch.
    launch_kernel_ex:
        Option<unsafe extern "C" fn(*const CuLaunchConfig, CuFunction, *mut *mut c_void, *mut *mut c_void) -> CuResult>,
    mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
    memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    memset_d8: unsafe extern "C" fn(CuDevicePtr, u8, usize) -> CuResult,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(CuStream) -> CuResult,
    stream_begin_capture: unsafe extern "C" fn(CuStream, c_int) -> CuResult,
    stream_end_capture: unsafe extern "C" fn(CuStream, *mut CuGraph) -> CuResult,
    graph_instantiate: unsafe extern "C" fn(*mut CuGraphExec, CuGraph, u64) -> CuResult,
    graph_launch: unsafe extern "C" fn(CuGraphExec, CuStream) -> CuResult,
    graph_destroy: unsafe extern "C" fn(CuGraph) -> CuResult,
    graph_exec_destroy: unsafe extern "C" fn(CuGraphExec) -> CuResult,
}

impl Driver {
    fn open() -> Result<Driver> {
        let lib = open_first(&["libcuda.so.1", "libcuda.so"], "the CUDA driver")?;
        Ok(Driver {
            init: sym!(lib, "cuInit"),
            driver_get_version: sym!(lib, "cuDriverGetVersion"),
            device_get_count: sym!(lib, "cuDeviceGetCount"),
            device_get: sym!(lib, "cuDeviceGet"),
            device_get_attribute: sym!(lib, "cuDeviceGetAttribute"),
            device_get_name: sym!(lib, "cuDeviceGetName"),
            primary_ctx_retain: sym!(lib, "cuDevicePrimaryCtxRetain"),
            ctx_set_current: sym!(lib, "cuCtxSetCurrent"),
            ctx_synchronize: sym!(lib, "cuCtxSynchronize"),
            module_load_data: sym!(lib, "cuModuleLoadData"),
            module_get_function: sym!(lib, "cuModuleGetFunction"),
            func_set_attribute: sym!(lib, "cuFuncSetAttribute"),
            launch_kernel: sym!(lib, "cuLaunchKernel"),
            // SAFETY: cuLaunchKernelEx's prototype from cuda.h, as declared above.
            launch_kernel_ex: unsafe { lib.get(b"cuLaunchKernelEx\0") }.ok().map(|s| *s),
            mem_alloc: sym!(lib, "cuMemAlloc_v2"),
            mem_free: sym!(lib, "cuMemFree_v2"),
            memcpy_htod: sym!(lib, "cuMemcpyHtoD_v2"),
            memcpy_dtoh: sym!(lib, "cuMemcpyDtoH_v2"),
            memset_d8: sym!(lib, "cuMemsetD8_v2"),
            mem_get_info: sym!(lib, "cuMemGetInfo_v2"),
            get_error_string: sym!(lib, "cuGetErrorString"),
            stream_create: sym!(lib, "cuStreamCreate"),
            stream_synchronize: sym!(lib, "cuStreamSynchronize"),
            stream_begin_capture: sym!(lib, "cuStreamBeginCapture_v2"),
            stream_end_capture: sym!(lib, "cuStreamEndCapture"),
            graph_instantiate: sym!(lib, "cuGraphInstantiateWithFlags"),
            graph_launch: sym!(lib, "cuGraphLaunch"),
            graph_destroy: sym!(lib, "cuGraphDestroy"),
            graph_exec_destroy: sym!(lib, "cuGraphExecDestroy"),
            _lib: lib,
        })
    }

    fn check(&self, r: CuResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
        unsafe { (self.get_error_string)(r, &mut s) };
        let text = if s.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: a non-null result is a NUL-terminated static string.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(cuda_err(format!("{what}: CUDA error {r} ({text})")))
    }
}

fn open_first(names: &[&str], what: &str) -> Result<libloading::Library> {
    let mut errs = Vec::new();
    for n in names {
        // SAFETY: loading a system library runs its initialisers; these are NVIDIA's
        // driver and NVRTC libraries, which expect to be loaded this way.
        match unsafe { libloading::Library::new(n) } {
            Ok(l) => return Ok(l),
            Err(e) => errs.push(format!("{n}: {e}")),
        }
    }
    Err(cuda_err(format!("{what} is not available ({})", errs.join("; "))))
}

struct Nvrtc {
    _lib: libloading::Library,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    create_program: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile_program: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult,
    get_program_log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult,
    get_program_log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult,
    get_cubin_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult,
    get_cubin: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult,
    destroy_program: unsafe extern "C" fn(*mut NvrtcProgram) -> NvrtcResult,
}

impl Nvrtc {
    fn open() -> Result<Nvrtc> {
        let mut names: Vec<String> = Vec::new();
        if let Some(p) = std::env::var_os("EDGELM_NVRTC") {
            names.push(p.to_string_lossy().into_owned());
        }
        for v in ["13", "12"] {
            names.push(format!("libnvrtc.so.{v}"));
        }
        for dir in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib"] {
            for v in ["13", "12"] {
                names.push(format!("{dir}/libnvrtc.so.{v}"));
            }
        }
        names.push("libnvrtc.so".into());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let lib = open_first(&refs, "NVRTC (the CUDA run-time compiler; set EDGELM_NVRTC to its path)")?;
        Ok(Nvrtc {
            version: sym!(lib, "nvrtcVersion"),
            create_program: sym!(lib, "nvrtcCreateProgram"),
            compile_program: sym!(lib, "nvrtcCompileProgram"),
            get_program_log_size: sym!(lib, "nvrtcGetProgramLogSize"),
            get_program_log: sym!(lib, "nvrtcGetProgramLog"),
            get_cubin_size: sym!(lib, "nvrtcGetCUBINSize"),
            get_cubin: sym!(lib, "nvrtcGetCUBIN"),
            destroy_program: sym!(lib, "nvrtcDestroyProgram"),
            _lib: lib,
        })
    }

    fn version(&self) -> (i32, i32) {
        let (mut a, mut b) = (0, 0);
        // SAFETY: two out-parameters.
        unsafe { (self.version)(&mut a, &mut b) };
        (a, b)
    }

    /// Compile `src` to a cubin for `sm_{arch}`; the error carries NVRTC's log.
    fn compile(&self, src: &str, name: &str, arch: u32) -> Result<Vec<u8>> {
        let csrc = CString::new(src).map_err(|_| cuda_err("kernel source contains NUL"))?;
        let cname = CString::new(name).map_err(|_| cuda_err("kernel name contains NUL"))?;
        let opts: Vec<CString> = compile_options(arch).into_iter().map(|o| CString::new(o).expect("no NUL")).collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings; no headers are passed.
        let r = unsafe {
            (self.create_program)(&mut prog, csrc.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null())
        };
        if r != 0 {
            return Err(cuda_err(format!("nvrtcCreateProgram failed ({r})")));
        }
        // SAFETY: `prog` was created above; the options outlive the call.
        let r = unsafe { (self.compile_program)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let mut log_size = 0usize;
        // SAFETY: `prog` is live; the buffer is as large as NVRTC says the log is.
        let log = unsafe {
            (self.get_program_log_size)(prog, &mut log_size);
            let mut buf = vec![0u8; log_size.max(1)];
            (self.get_program_log)(prog, buf.as_mut_ptr().cast());
            String::from_utf8_lossy(&buf[..log_size.saturating_sub(1)]).into_owned()
        };
        let out = if r != 0 {
            Err(cuda_err(format!("NVRTC could not compile {name} for sm_{arch}:\n{log}")))
        } else {
            let mut n = 0usize;
            // SAFETY: as above; the buffer has the size NVRTC reports.
            unsafe {
                (self.get_cubin_size)(prog, &mut n);
                let mut cubin = vec![0u8; n];
                (self.get_cubin)(prog, cubin.as_mut_ptr().cast());
                Ok(cubin)
            }
        };
        // SAFETY: destroyed once, after its last use.
        unsafe { (self.destroy_program)(&mut prog) };
        out
    }
}

/// NVRTC options: real machine code for the GPU found, fast math off (the kernels are
/// tested against the CPU with tight tolerances).
/// The dynamic shared memory the `mmq` kernels may take a block (the most sm_86 and
/// sm_89 allow; sm_80/sm_87 allow 163 KiB, sm_90 227).
pub const MAX_DYNAMIC_SHARED: u32 = 99 * 1024;

pub fn compile_options(arch: u32) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{arch}"), "--std=c++17".into(), "-default-device".into()]
}

/// Compile the kernels for `sm_{arch}` (no GPU needed, only NVRTC): what CI runs for
/// sm_87 (Jetson Orin) and sm_90 (H100/H200). Returns the cubin's size.
pub fn compile_kernels_for(arch: u32) -> Result<usize> {
    let nvrtc = Nvrtc::open()?;
    Ok(nvrtc.compile(KERNELS_CU, "kernels.cu", arch)?.len())
}

/// The version of the NVRTC that would compile the kernels.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    Ok(Nvrtc::open()?.version())
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELM_CUDA_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir).join("edgelm/cuda")
}

/// The GPU a model runs on: the driver, a context, and the compiled kernels.
pub struct Gpu {
    drv: Driver,
    ctx: CuContext,
    pub ordinal: usize,
    pub name: String,
    /// Compute capability as `major * 10 + minor` (87 on Orin, 90 on H100/H200).
    pub arch: u32,
    /// CPU and GPU share DRAM (Jetson): there is no point in a second copy.
    pub integrated: bool,
    pub driver_version: i32,
    /// Streaming multiprocessors (launch shapes aim at filling them).
    pub sms: u32,
    /// Kernels are launched with programmatic dependent launch (sm_90+ and a driver
    /// with cuLaunchKernelEx; EDGELM_CUDA_PDL=0 turns it off): each one's start overlaps
    /// the end of the one before, which it waits for inside (kernels.cu GRID_DEP_WAIT).
    pub pdl: bool,
    module: CuModule,
    /// The stream every launch goes to (a blocking stream: it orders with the
    /// synchronous copies on the legacy stream; capturable into CUDA graphs).
    stream: CuStream,
    funcs: std::sync::Mutex<std::collections::HashMap<&'static str, usize>>,
    /// Where the cubin came from: "cache" or "nvrtc" (for the log line).
    pub kernels_from: &'static str,
    /// EDGELM_CUDA_PROFILE=1: every launch is waited for and timed, by kernel name
    /// (a diagnosis tool: it serialises everything).
    profile: Option<std::sync::Mutex<std::collections::HashMap<&'static str, (u64, f64)>>>,
}

// SAFETY: the context handle and module are process-wide driver objects; every call
// first makes the context current on the calling thread (`bind`).
unsafe impl Send for Gpu {}
// SAFETY: as above; the function cache is behind a Mutex.
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Open GPU `ordinal`, compile (or load from cache) the kernels for it.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        let drv = Driver::open()?;
        // SAFETY: plain driver calls with out-parameters.
        unsafe {
            drv.check((drv.init)(0), "cuInit")?;
            let mut ver = 0;
            drv.check((drv.driver_get_version)(&mut ver), "cuDriverGetVersion")?;
            let mut n = 0;
            drv.check((drv.device_get_count)(&mut n), "cuDeviceGetCount")?;
            if ordinal >= n.max(0) as usize {
                return Err(cuda_err(format!("there is no CUDA device {ordinal} ({n} found)")));
            }
            let mut dev: CuDevice = 0;
            drv.check((drv.device_get)(&mut dev, ordinal as c_int), "cuDeviceGet")?;
            let (mut major, mut minor, mut integ, mut sms) = (0, 0, 0, 0);
            drv.check(
                (drv.device_get_attribute)(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
                "attribute",
            )?;
            drv.check(
                (drv.device_get_attribute)(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
                "attribute",
            )?;
            drv.check((drv.device_get_attribute)(&mut integ, CU_DEVICE_ATTRIBUTE_INTEGRATED, dev), "attribute")?;
            drv.check(
                (drv.device_get_attribute)(&mut sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
                "attribute",
            )?;
            let mut name = [0 as c_char; 256];
            drv.check((drv.device_get_name)(name.as_mut_ptr(), 256, dev), "cuDeviceGetName")?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            // The tensor-core kernels (mma.sync on int8, cp.async, ldmatrix) are sm_80's.
            if major < 8 {
                return Err(cuda_err(format!(
                    "{name} (CUDA device {ordinal}) has compute capability {major}.{minor}; edgelm's CUDA kernels need 8.0 or \
                     newer (Ampere, Ada, Hopper, Jetson Orin): set device: cpu, or device: auto to fall back to the CPU"
                )));
            }
            let mut ctx: CuContext = std::ptr::null_mut();
            drv.check((drv.primary_ctx_retain)(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            drv.check((drv.ctx_set_current)(ctx), "cuCtxSetCurrent")?;
            let arch = (major * 10 + minor) as u32;
            let (cubin, from) = Self::kernels(arch)?;
            let mut module: CuModule = std::ptr::null_mut();
            drv.check((drv.module_load_data)(&mut module, cubin.as_ptr().cast()), "cuModuleLoadData (the kernels)")?;
            let mut stream: CuStream = std::ptr::null_mut();
            drv.check((drv.stream_create)(&mut stream, 0), "cuStreamCreate")?;
            let pdl = arch >= 90
                && drv.launch_kernel_ex.is_some()
                && std::env::var("EDGELM_CUDA_PDL").map_or(true, |v| v != "0");
            Ok(Arc::new(Gpu {
                sms: sms.max(1) as u32,
                pdl,
                stream,
                drv,
                ctx,
                ordinal,
                name,
                arch,
                integrated: integ != 0,
                driver_version: ver,
                module,
                funcs: Default::default(),
                kernels_from: from,
                profile: std::env::var_os("EDGELM_CUDA_PROFILE").filter(|v| v != "0").map(|_| Default::default()),
            }))
        }
    }

    fn kernels(arch: u32) -> Result<(Vec<u8>, &'static str)> {
        let nvrtc = Nvrtc::open()?;
        let (a, b) = nvrtc.version();
        let opts = compile_options(arch).join(" ");
        let key = fnv1a(&[KERNELS_CU.as_bytes(), opts.as_bytes(), format!("{a}.{b}").as_bytes()]);
        let path = cache_dir().join(format!("kernels-{key:016x}-sm_{arch}.cubin"));
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok((bytes, "cache"));
            }
        }
        let cubin = nvrtc.compile(KERNELS_CU, "kernels.cu", arch)?;
        // A cache that cannot be written only costs the next start a compile.
        if std::fs::create_dir_all(path.parent().expect("has a parent")).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((cubin, "nvrtc"))
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context was retained in `open` and lives as long as `self`.
        self.drv.check(unsafe { (self.drv.ctx_set_current)(self.ctx) }, "cuCtxSetCurrent")
    }

    fn func(&self, name: &'static str) -> Result<CuFunction> {
        let mut cache = self.funcs.lock().expect("not poisoned");
        if let Some(&f) = cache.get(name) {
            return Ok(f as CuFunction);
        }
        let cname = CString::new(name).expect("no NUL");
        let mut f: CuFunction = std::ptr::null_mut();
        // SAFETY: the module is loaded; the name is NUL-terminated.
        self.drv.check(unsafe { (self.drv.module_get_function)(&mut f, self.module, cname.as_ptr()) }, name)?;
        if name.starts_with("mmq_") {
            // Their staging takes more than the 48 KiB a block gets without asking.
            const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;
            // SAFETY: a function of our module; an int attribute.
            let r = unsafe {
                (self.drv.func_set_attribute)(
                    f,
                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    MAX_DYNAMIC_SHARED as c_int,
                )
            };
            self.drv.check(r, name)?;
        }
        cache.insert(name, f as usize);
        Ok(f)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: two out-parameters.
        self.drv.check(unsafe { (self.drv.mem_get_info)(&mut free, &mut total) }, "cuMemGetInfo")?;
        Ok((free, total))
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        let mut p: CuDevicePtr = 0;
        // SAFETY: out-parameter; a zero-size request is rounded up to keep pointers valid.
        self.drv.check(unsafe { (self.drv.mem_alloc)(&mut p, bytes.max(4)) }, &format!("cuMemAlloc({bytes} bytes)"))?;
        Ok(DevBuf { gpu: Arc::clone(self), ptr: p, bytes })
    }

    pub fn upload(self: &Arc<Self>, data: &[u8]) -> Result<DevBuf> {
        let b = self.alloc(data.len())?;
        b.write(0, data)?;
        Ok(b)
    }

    pub fn upload_f32(self: &Arc<Self>, data: &[f32]) -> Result<DevBuf> {
        self.upload(as_bytes(data))
    }

    pub fn zeros(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let b = self.alloc(bytes)?;
        // SAFETY: the range is the buffer's own.
        self.drv.check(unsafe { (self.drv.memset_d8)(b.ptr, 0, bytes) }, "cuMemsetD8")?;
        Ok(b)
    }

    /// Launch `name` on a `grid` of `block`-thread blocks; `args` are pointers to
    /// each kernel parameter, in order (see `Arg`).
    pub fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.bind()?;
        let f = self.func(name)?;
        let t0 = self.profile.as_ref().map(|_| std::time::Instant::now());
        let mut storage: Vec<u64> = args.iter().map(Arg::bits).collect();
        let mut ptrs: Vec<*mut c_void> = storage.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        // SAFETY: every parameter is passed by pointer to 8 bytes of storage that holds
        // its value (a device pointer, or an int/float in the low bytes, little endian),
        // which is what cuLaunchKernel reads for parameters of at most that size.
        let r = match self.drv.launch_kernel_ex.filter(|_| self.pdl) {
            Some(launch_ex) => {
                let mut attr = CuLaunchAttribute {
                    id: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                    pad: [0; 4],
                    value: [0; 8],
                };
                attr.value[0] = 1; // programmaticStreamSerializationAllowed (an int, little endian)
                let cfg = CuLaunchConfig {
                    grid: [grid.0, grid.1, grid.2],
                    block: [block, 1, 1],
                    shared,
                    stream: self.stream,
                    attrs: &mut attr,
                    num_attrs: 1,
                };
                // SAFETY: as for cuLaunchKernel; the config and its attribute outlive the call.
                unsafe { launch_ex(&cfg, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) }
            }
            // SAFETY: see above.
            None => unsafe {
                (self.drv.launch_kernel)(
                    f,
                    grid.0,
                    grid.1,
                    grid.2,
                    block,
                    1,
                    1,
                    shared,
                    self.stream,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
        };
        self.drv.check(r, name)?;
        if let (Some(p), Some(t0)) = (&self.profile, t0) {
            // SAFETY: our stream.
            self.drv.check(unsafe { (self.drv.stream_synchronize)(self.stream) }, name)?;
            let mut m = p.lock().expect("not poisoned");
            let e = m.entry(name).or_default();
            e.0 += 1;
            e.1 += t0.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// (kernel, launches, seconds) since the last call, when EDGELM_CUDA_PROFILE is set.
    pub fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut v: Vec<_> = p.lock().expect("not poisoned").drain().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    pub fn sync(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream lives as long as `self`.
        self.drv.check(unsafe { (self.drv.stream_synchronize)(self.stream) }, "cuStreamSynchronize")?;
        // SAFETY: no arguments.
        self.drv.check(unsafe { (self.drv.ctx_synchronize)() }, "cuCtxSynchronize")
    }

    /// Record the launches `f` makes into a CUDA graph instead of running them (the
    /// capture always ends, also when `f` fails); the graph replays them with one launch.
    pub fn capture(self: &Arc<Self>, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        self.bind()?;
        self.drv.check(
            // SAFETY: our stream; ended below on every path.
            unsafe { (self.drv.stream_begin_capture)(self.stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) },
            "cuStreamBeginCapture",
        )?;
        let r = f();
        let mut graph: CuGraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above.
        let end =
            self.drv.check(unsafe { (self.drv.stream_end_capture)(self.stream, &mut graph) }, "cuStreamEndCapture");
        r?;
        end?;
        let mut exec: CuGraphExec = std::ptr::null_mut();
        // SAFETY: a complete graph; it is no longer needed once instantiated.
        let inst = self.drv.check(unsafe { (self.drv.graph_instantiate)(&mut exec, graph, 0) }, "cuGraphInstantiate");
        // SAFETY: destroyed once.
        unsafe { (self.drv.graph_destroy)(graph) };
        inst?;
        Ok(Graph { gpu: Arc::clone(self), exec })
    }
}

/// A captured sequence of launches, replayed by `launch`.
pub struct Graph {
    gpu: Arc<Gpu>,
    exec: CuGraphExec,
}

// SAFETY: a graph exec is a driver object usable from any thread with the context.
unsafe impl Send for Graph {}

impl Graph {
    pub fn launch(&self) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: instantiated in `Gpu::capture`, replayed on the same stream.
        self.gpu.drv.check(unsafe { (self.gpu.drv.graph_launch)(self.exec, self.gpu.stream) }, "cuGraphLaunch")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: destroyed once.
            unsafe { (self.gpu.drv.graph_exec_destroy)(self.exec) };
        }
    }
}

/// One kernel parameter.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    U64(u64),
}

impl Arg {
    fn bits(&self) -> u64 {
        match *self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::U32(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// Device memory, freed on drop.
pub struct DevBuf {
    gpu: Arc<Gpu>,
    ptr: CuDevicePtr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }
    /// Device pointer `offset` bytes in.
    pub fn at(&self, offset: usize) -> Arg {
        debug_assert!(offset <= self.bytes);
        Arg::Ptr(self.ptr + offset as u64)
    }

    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        if offset + data.len() > self.bytes {
            return Err(cuda_err(format!(
                "write of {} bytes at {offset} past a {}-byte buffer",
                data.len(),
                self.bytes
            )));
        }
        self.gpu.bind()?;
        // SAFETY: the range was checked against the allocation.
        self.gpu.drv.check(
            unsafe { (self.gpu.drv.memcpy_htod)(self.ptr + offset as u64, data.as_ptr().cast(), data.len()) },
            "cuMemcpyHtoD",
        )
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        if offset + out.len() > self.bytes {
            return Err(cuda_err(format!("read of {} bytes at {offset} past a {}-byte buffer", out.len(), self.bytes)));
        }
        self.gpu.bind()?;
        // SAFETY: the range was checked against the allocation.
        self.gpu.drv.check(
            unsafe { (self.gpu.drv.memcpy_dtoh)(out.as_mut_ptr().cast(), self.ptr + offset as u64, out.len()) },
            "cuMemcpyDtoH",
        )
    }

    pub fn read_f32(&self, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0f32; n];
        self.read(0, as_bytes_mut(&mut v))?;
        Ok(v)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by cuMemAlloc and freed once.
            unsafe { (self.gpu.drv.mem_free)(self.ptr) };
        }
    }
}

pub fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32, u32, i32) viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: any bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// A device an executor runs on: `cpu | cuda | cuda:N`. The daemon's `device: auto`
/// is resolved before this, in one place (its model pool: a usable GPU 0, else the
/// CPU with a log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| Error::invalid(format!("device {s:?}: expected cpu, cuda or cuda:N"))),
        }
    }
}

static PROBE: OnceLock<std::result::Result<Arc<Gpu>, String>> = OnceLock::new();

/// GPU 0 if this machine has a usable one (opened once per process), else why not.
pub fn probe() -> std::result::Result<Arc<Gpu>, String> {
    PROBE
        .get_or_init(|| {
            Gpu::open(0).map_err(|e| match e {
                Error::Cuda(m) => m,
                other => other.to_string(),
            })
        })
        .clone()
}
