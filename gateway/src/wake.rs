//! Wakers that note which of a task's sources woke it, so the task's next poll asks only those.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use atomic_waker::AtomicWaker;

/// The sources (one bit each) that woke a task since it last looked, and the task to wake.
#[derive(Default)]
pub struct Woken {
    task: AtomicWaker,
    sources: AtomicU8,
}

impl Woken {
    /// A set with the sources in `fired` already noted (so a first poll looks at them).
    pub fn new(fired: u8) -> Arc<Self> {
        Arc::new(Self {
            task: AtomicWaker::new(),
            sources: AtomicU8::new(fired),
        })
    }

    /// The waker to poll source `bit` with: it notes the bit, then wakes the task.
    pub fn waker(self: &Arc<Self>, bit: u8) -> Waker {
        Waker::from(Arc::new(SourceWaker {
            woken: self.clone(),
            bit,
        }))
    }

    /// Makes `task` the waker a source wakes. Call it before looking at the sources, so that
    /// a wake-up that comes while they are looked at still reaches the task.
    pub fn register(&self, task: &Waker) {
        self.task.register(task);
    }

    /// The sources that woke the task since the last call, forgotten from now on.
    pub fn take(&self) -> u8 {
        self.sources.swap(0, Ordering::AcqRel)
    }
}

/// One source's waker (see [`Woken::waker`]).
struct SourceWaker {
    woken: Arc<Woken>,
    bit: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.sources.fetch_or(self.bit, Ordering::AcqRel);
        self.woken.task.wake();
    }
}
