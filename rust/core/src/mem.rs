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
        // SAFETY: sysconf has no preconditions (16 KiB pages on a Pi 5's kernel).
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
        // Rounded to the base page only: a small tensor must not take a whole huge page
        // (a 270M model has dozens of sub-megabyte matrices), and a large one's tail
        // past its last 2 MiB boundary is 4 KiB pages.
        let map_len = len.max(1).div_ceil(page) * page;
        let map = |n: usize| {
            // SAFETY: a fresh private anonymous mapping; checked for failure below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    n,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert!(p != libc::MAP_FAILED, "cannot map {n} bytes of memory");
            p.cast::<u8>()
        };
        if map_len < HUGE {
            return HugeBuf { ptr: map(map_len), len, map_len };
        }
        // Over-map by one huge page and keep the 2 MiB-aligned part, so every whole
        // 2 MiB of the buffer can be one huge page.
        let raw = map(map_len + HUGE);
        let head = (raw as usize).next_multiple_of(HUGE) - raw as usize;
        // SAFETY: head and tail are parts of the mapping just made, unused.
        unsafe {
            if head > 0 {
                libc::munmap(raw.cast(), head);
            }
            let tail = HUGE - head;
            if tail > 0 {
                libc::munmap(raw.add(head + map_len).cast(), tail);
            }
        }
        // SAFETY: inside the mapping kept above.
        let ptr = unsafe { raw.add(head) };
        // SAFETY: advice on our own mapping; failure (no THP) only costs speed.
        unsafe { libc::madvise(ptr.cast(), map_len, libc::MADV_HUGEPAGE) };
        HugeBuf { ptr, len, map_len }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zero_writable_and_large_ones_huge_aligned() {
        for len in [0, 1, 4095, 4097, 600 << 10, 2 << 20, (3 << 20) + 5, 9 << 20] {
            let mut b = HugeBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            if len > 0 {
                b.as_mut_slice()[0] = 1;
                b.as_mut_slice()[len - 1] = 2;
                assert_eq!(b.as_slice()[len - 1], 2);
            }
            if len >= 2 << 20 {
                assert_eq!(b.as_slice().as_ptr() as usize % (2 << 20), 0, "{len}");
            }
            assert!(b.map_len < len.max(1) + 64 * 1024, "{len}: {} mapped", b.map_len);
        }
    }
}
