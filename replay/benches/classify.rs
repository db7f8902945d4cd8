//! Cost of classifying typical statements and of journaling a transaction's messages.
//! `cargo bench -p understudy-replay --bench classify` prints nanoseconds per call.

use std::hint::black_box;
use std::time::Instant;

use understudy_replay::classify::classify;
use understudy_replay::journal::Journal;

const STATEMENTS: [&str; 6] = [
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + -4053 WHERE aid = 612342;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 612342;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 612342, -4053, CURRENT_TIMESTAMP);",
    "END;",
    "/* app=web */ SELECT o.id, o.total FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.email = 'a@example.com' ORDER BY o.created_at DESC LIMIT 20",
];

fn per_call(label: &str, iterations: u32, mut f: impl FnMut()) {
    for _ in 0..iterations / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{label:<60} {ns:>9.1} ns");
}

fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

fn main() {
    for sql in STATEMENTS {
        let label: String = sql.chars().take(58).collect();
        per_call(&label, 200_000, || {
            black_box(classify(black_box(sql)));
        });
    }
    // One pgbench -N transaction through the journal: five queries, each answered.
    let messages: Vec<Vec<u8>> = STATEMENTS[..5].iter().map(|s| query(s)).collect();
    let mut journal = Journal::new(1 << 20);
    per_call(
        "journal: pgbench -N transaction (5 queries)",
        50_000,
        || {
            for (i, m) in messages.iter().enumerate() {
                journal.on_client_message(b'Q', m);
                journal.on_server_bytes(b'C', b"C\0\0\0\x0bUPDATE 1\0");
                journal.on_ready_for_query(if i == 4 { b'I' } else { b'T' });
            }
        },
    );
}
