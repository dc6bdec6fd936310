//! Memory that streams: anonymous mappings advised into 2 MiB pages.
//!
//! Decode reads hundreds of megabytes per token (packed weights, a long context's KV
//! cache). Through 4 KiB pages that costs a TLB miss every 64 cache lines, and one
//! core streamed 20 GB/s of weights where 2 MiB pages gave 31–34 (this VM). The kernel
//! gives huge pages to anonymous mappings advised with `MADV_HUGEPAGE` where THP is
//! `madvise` or `always`; elsewhere the advice is ignored and only speed is lost.

/// Zeroed anonymous memory, in 2 MiB pages where the kernel gives them
/// (`MADV_HUGEPAGE`): streaming hundreds of megabytes of weights per token through
/// 4 KiB pages costs a TLB miss every 64 cache lines.
#[derive(Debug)]
pub struct HugeBuf {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
}

// SAFETY: HugeBuf owns its mapping exclusively; &HugeBuf only reads it.
unsafe impl Send for HugeBuf {}
// SAFETY: as above.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    pub fn zeroed(len: usize) -> HugeBuf {
        const HUGE: usize = 2 << 20;
        let map_len = len.max(1).div_ceil(HUGE) * HUGE;
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE,
                       libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert!(ptr != libc::MAP_FAILED, "packed weights: cannot map {map_len} bytes");
        // SAFETY: advice on our own mapping; failure (no THP) only costs speed.
        unsafe { libc::madvise(ptr, map_len, libc::MADV_HUGEPAGE) };
        HugeBuf { ptr: ptr.cast(), len, map_len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped, readable and initialised (zero or written).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `zeroed`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.map_len) };
    }
}


/// `n` f16 values, zero, in a `HugeBuf` (the KV cache: pages are touched only as
/// blocks are used, and a long context's keys stream through 2 MiB pages).
#[derive(Debug)]
pub struct HugeF16(HugeBuf);

impl HugeF16 {
    pub fn zeroed(n: usize) -> HugeF16 {
        HugeF16(HugeBuf::zeroed(n * 2))
    }

    pub fn as_slice(&self) -> &[half::f16] {
        let b = self.0.as_slice();
        // SAFETY: f16 is #[repr(transparent)] over u16; the mapping is page-aligned and
        // holds len/2 initialised u16 (zero is +0.0).
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 2) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [half::f16] {
        let b = self.0.as_mut_slice();
        // SAFETY: as above, with &mut self the only access.
        unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), b.len() / 2) }
    }
}
