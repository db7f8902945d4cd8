//! Wakers that note which of a task's sources woke it, so the task's next poll asks only those.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::watch;

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
        // Mostly none: a load is cheaper than the swap.
        if self.sources.load(Ordering::Acquire) == 0 {
            return 0;
        }
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

/// Resolves at `receiver`'s next change (never, once its sender is gone). Cheap to poll again
/// and again: until the channel signals, a poll is a flag check, not a look at the channel.
pub fn changed<T>(receiver: &mut watch::Receiver<T>) -> Changed<impl Future<Output = ()> + '_> {
    const BIT: u8 = 1;
    // Noted as rung, so the first poll looks at the channel.
    let bell = Woken::new(BIT);
    Changed {
        change: changed_on(receiver, &bell, BIT),
        bell,
    }
}

/// `receiver`'s next change as source `bit` of `woken`, which the owner shares with other
/// sources: it registers the task and takes the bits once for all of them (see
/// [`Change::poll_rung`]).
pub fn changed_on<'a, T>(
    receiver: &'a mut watch::Receiver<T>,
    woken: &Arc<Woken>,
    bit: u8,
) -> Change<impl Future<Output = ()> + 'a> {
    let inner = Box::pin(async move {
        if receiver.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    });
    Change {
        inner,
        waker: woken.waker(bit),
        bit,
    }
}

/// A watch channel's next change, as one source of a shared [`Woken`] (see [`changed_on`]).
pub struct Change<F> {
    inner: Pin<Box<F>>,
    /// The waker `inner` is polled with: it notes `bit`, then wakes the task.
    waker: Waker,
    bit: u8,
}

impl<F: Future<Output = ()>> Change<F> {
    /// Whether the channel changed, looked at only if `rung` (the bits taken from the shared
    /// [`Woken`]) has this source's bit: otherwise it has not signalled since the last look.
    /// A new `Change` must be looked at once, to be registered with its channel.
    pub fn poll_rung(&mut self, rung: u8) -> Poll<()> {
        if rung & self.bit == 0 {
            return Poll::Pending;
        }
        self.inner
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
    }
}

/// The future [`changed`] returns: a [`Change`] with a [`Woken`] of its own.
pub struct Changed<F> {
    change: Change<F>,
    bell: Arc<Woken>,
}

impl<F: Future<Output = ()>> Future for Changed<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.bell.register(cx.waker());
        let rung = this.bell.take();
        this.change.poll_rung(rung)
    }
}
