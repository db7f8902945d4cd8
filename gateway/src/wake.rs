//! Wakers that note which of a task's sources woke it, so the task's next poll asks only those.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::watch;

/// The sources (one bit each) that woke a task since it last looked, and the task to wake.
///
/// The task's waker stays registered when it is woken: a task that polls again and again
/// with the same waker registers it once (see [`Bell`]), so a poll costs no atomic
/// read-modify-write unless a source rang.
pub struct Woken {
    task: Mutex<Option<Waker>>,
    sources: AtomicU8,
}

impl Woken {
    /// A set with the sources in `fired` already noted (so a first poll looks at them).
    pub fn new(fired: u8) -> Arc<Self> {
        Arc::new(Self {
            task: Mutex::new(None),
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

    /// The sources that woke the task since the last call, forgotten from now on.
    fn take(&self) -> u8 {
        // Mostly none: a load is cheaper than the swap.
        if self.sources.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.sources.swap(0, Ordering::AcqRel)
    }
}

/// The task's side of a [`Woken`]: keeps the waker it registered, to register again only
/// when the task polls with another.
pub struct Bell {
    woken: Arc<Woken>,
    registered: Option<Waker>,
}

impl Bell {
    /// A bell whose sources in `fired` count as rung (so a first poll looks at them).
    pub fn new(fired: u8) -> Self {
        Self {
            woken: Woken::new(fired),
            registered: None,
        }
    }

    /// The record the sources ring (see [`Woken::waker`]).
    pub fn woken(&self) -> &Arc<Woken> {
        &self.woken
    }

    /// Makes `cx`'s waker the one the sources wake, then returns the sources that rang since
    /// the last call. Call it before looking at the sources, so that one ringing while they
    /// are looked at still wakes the task.
    pub fn take(&mut self, cx: &Context<'_>) -> u8 {
        let task = cx.waker();
        if !self.registered.as_ref().is_some_and(|r| r.will_wake(task)) {
            *self
                .woken
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            self.registered = Some(task.clone());
        }
        self.woken.take()
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
        let task = self
            .woken
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Resolves at `receiver`'s next change (never, once its sender is gone). Cheap to poll again
/// and again: until the channel signals, a poll is a flag check, not a look at the channel.
pub fn changed<T>(receiver: &mut watch::Receiver<T>) -> Changed<impl Future<Output = ()> + '_> {
    const BIT: u8 = 1;
    // Noted as rung, so the first poll looks at the channel.
    let bell = Bell::new(BIT);
    Changed {
        change: changed_on(receiver, bell.woken(), BIT),
        bell,
    }
}

/// `receiver`'s next change as source `bit` of `woken`, which the owner shares with other
/// sources: its [`Bell`] registers the task and takes the bits once for all of them (see
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
    /// [`Bell`]) has this source's bit: otherwise it has not signalled since the last look.
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
    bell: Bell,
}

impl<F: Future<Output = ()>> Future for Changed<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let rung = this.bell.take(cx);
        this.change.poll_rung(rung)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count(c: &Arc<Count>) -> usize {
        c.0.load(Ordering::Relaxed)
    }

    /// The task's waker is registered once and stays: every ring wakes it and is reported
    /// once, and a task polling with another waker is the one woken from then on.
    #[test]
    fn a_bell_wakes_its_latest_task_at_every_ring_and_reports_each_once() {
        let first = Arc::new(Count::default());
        let first_waker = Waker::from(first.clone());
        let mut bell = Bell::new(0);
        let mut cx = Context::from_waker(&first_waker);
        assert_eq!(bell.take(&cx), 0);
        let source = bell.woken().waker(4);
        let other = bell.woken().waker(8);
        source.wake_by_ref();
        assert_eq!(count(&first), 1);
        assert_eq!(bell.take(&cx), 4);
        assert_eq!(bell.take(&cx), 0, "reported once");
        // No new registration in between: the waker was not used up by the first ring.
        source.wake_by_ref();
        other.wake_by_ref();
        assert_eq!(count(&first), 3);
        assert_eq!(bell.take(&cx), 4 | 8);

        let second = Arc::new(Count::default());
        let second_waker = Waker::from(second.clone());
        cx = Context::from_waker(&second_waker);
        assert_eq!(bell.take(&cx), 0);
        source.wake();
        assert_eq!((count(&first), count(&second)), (3, 1));
        assert_eq!(bell.take(&cx), 4);
    }

    /// `changed` resolves at the channel's next change, not before, and again at the one after.
    #[tokio::test]
    async fn changed_resolves_at_each_change() {
        let (sender, mut receiver) = watch::channel(0);
        let task = Waker::from(Arc::new(Count::default()));
        {
            let mut change = std::pin::pin!(changed(&mut receiver));
            let mut cx = Context::from_waker(&task);
            assert!(change.as_mut().poll(&mut cx).is_pending());
            assert!(change.as_mut().poll(&mut cx).is_pending(), "nothing rang");
            sender.send(1).unwrap();
            assert!(change.as_mut().poll(&mut cx).is_ready());
        }
        let next = changed(&mut receiver);
        sender.send(2).unwrap();
        crate::clock::timeout(std::time::Duration::from_secs(5), next)
            .await
            .expect("the second change resolves too");
    }
}
