//! zmesh-aead-bench: the AEAD behind every HBONE byte, aws-lc-rs against ring, on this CPU.
//! AES-256-GCM (the suite ztunnel prefers) sealing and opening full 16 KiB TLS records (bulk
//! transfer) and 64-byte records (ping-pong), one thread, best of three rounds per figure.
//! BENCHMARKS.md records why zmesh's TLS provider is aws-lc-rs.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// One AEAD implementation, sealing then opening `buf` in place with a fresh nonce per record.
trait Aead {
    const NAME: &'static str;
    fn round_trip(&self, record: u64, buf: &mut Vec<u8>);
}

fn nonce(record: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&record.to_be_bytes());
    n
}

/// ring's and aws-lc-rs's AEAD APIs are the same; one body serves both.
macro_rules! aead_impl {
    ($name:ident, $krate:ident, $label:literal) => {
        struct $name($krate::aead::LessSafeKey);

        impl $name {
            fn aes_256_gcm(key: &[u8; 32]) -> Self {
                let key = $krate::aead::UnboundKey::new(&$krate::aead::AES_256_GCM, key)
                    .expect("a 32-byte key is valid for AES-256-GCM");
                Self($krate::aead::LessSafeKey::new(key))
            }
        }

        impl Aead for $name {
            const NAME: &'static str = $label;
            fn round_trip(&self, record: u64, buf: &mut Vec<u8>) {
                use $krate::aead::{Aad, Nonce};
                let n = || Nonce::assume_unique_for_key(nonce(record));
                self.0
                    .seal_in_place_append_tag(n(), Aad::empty(), buf)
                    .expect("sealing a record this size cannot fail");
                let len = self
                    .0
                    .open_in_place(n(), Aad::empty(), buf)
                    .expect("we just sealed it")
                    .len();
                buf.truncate(len);
            }
        }
    };
}

aead_impl!(AwsLc, aws_lc_rs, "aws-lc-rs");
aead_impl!(Ring, ring, "ring");

/// Nanoseconds per record (seal + open), the best of three rounds of `records` each.
fn measure(aead: &impl Aead, size: usize, records: u64) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let mut buf = vec![0x5a; size];
        let start = Instant::now();
        for record in 0..records {
            aead.round_trip(record, &mut buf);
            black_box(&buf);
        }
        best = best.min(start.elapsed());
    }
    best.as_nanos() as f64 / records as f64
}

fn main() {
    let key = [7u8; 32];
    let aws = AwsLc::aes_256_gcm(&key);
    let ring = Ring::aes_256_gcm(&key);
    println!("AES-256-GCM seal + open per record, one thread, best of 3 rounds");
    for (size, records) in [(16_384usize, 40_000u64), (64, 1_000_000)] {
        let a = measure(&aws, size, records);
        let r = measure(&ring, size, records);
        let gbps = |ns: f64| size as f64 / ns; // bytes per ns = GB/s
        println!(
            "{size:>6} B records: {} {a:8.0} ns ({:.2} GB/s), {} {r:8.0} ns ({:.2} GB/s); \
             ring/aws-lc-rs time {:.2}",
            AwsLc::NAME,
            gbps(a),
            Ring::NAME,
            gbps(r),
            r / a,
        );
    }
}
