//! Following bridge ports as they come and go, through netlink.
//!
//! A container runtime creates a container's veth, enslaves it to the
//! subnet's bridge and starts the container at any time; on a restart the
//! veth is new (new name, new ifindex). This module subscribes to the
//! kernel's link events (`RTNLGRP_LINK`: `RTM_NEWLINK` — which is also how
//! an `IFLA_MASTER` change is announced — and `RTM_DELLINK`) and, on each
//! batch of them, asks the [`Enforcer`] to attach what is new
//! ([`Enforcer::attach_new_ports`]: bridge devices, ports, bindings of
//! instance interfaces; links of interfaces that are gone are forgotten).
//!
//! Until a port is attached, the eBPF dataplane's fence drops what it sends
//! (see docs/semantics.md, "Ports not attached yet"); the watcher shortens
//! that window to the time one event takes to arrive, it does not make the
//! policy correct by itself. It owns the subscription only: it never
//! applies a model, never tears anything down.
//!
//! Two ways to run it: [`follow`] on the caller's tokio runtime, or
//! [`PortWatcher::spawn`] on a thread of its own.

use std::future::Future;

use futures_util::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

use crate::backend::{EnforceError, Enforcer};

/// Errors of the watcher.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Opening or binding the netlink socket failed.
    #[error("subscribing to the kernel's link events (netlink RTNLGRP_LINK)")]
    Subscribe(#[source] std::io::Error),
    /// The netlink connection ended (the socket closed).
    #[error("the kernel's link event stream ended")]
    Closed,
    /// The watcher's own runtime or thread could not be made.
    #[error("starting the port watcher's thread")]
    Thread(#[source] std::io::Error),
    /// The watcher's thread panicked.
    #[error("the port watcher's thread panicked")]
    Panicked,
}

/// One link event, as much of it as the watcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// `RTM_NEWLINK` (a link appeared or changed, e.g. was enslaved) or
    /// `RTM_DELLINK`.
    pub removed: bool,
    /// Its ifindex.
    pub ifindex: u32,
    /// Its name, when the message carries one.
    pub name: Option<String>,
    /// Its bridge (`IFLA_MASTER`), when it has one.
    pub master: Option<u32>,
}

impl LinkEvent {
    fn of(msg: &LinkMessage, removed: bool) -> LinkEvent {
        let mut e = LinkEvent {
            removed,
            ifindex: msg.header.index,
            name: None,
            master: None,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => e.name = Some(n.clone()),
                LinkAttribute::Controller(m) => e.master = Some(*m),
                _ => {}
            }
        }
        e
    }
}

type Messages = futures_channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to the kernel's link events. Made inside a tokio runtime
/// (its connection runs as a task of that runtime); events that happen
/// after [`LinkEvents::subscribe`] returns are never missed.
pub struct LinkEvents {
    messages: Messages,
    conn: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LinkEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEvents").finish_non_exhaustive()
    }
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl LinkEvents {
    /// Subscribes to `RTNLGRP_LINK` in this thread's network namespace.
    ///
    /// # Errors
    ///
    /// [`WatchError::Subscribe`] when the socket cannot be opened or bound.
    pub fn subscribe() -> Result<LinkEvents, WatchError> {
        let (conn, _handle, messages) =
            rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
                .map_err(WatchError::Subscribe)?;
        Ok(LinkEvents {
            messages,
            conn: tokio::spawn(conn),
        })
    }

    /// The next link event.
    ///
    /// # Errors
    ///
    /// [`WatchError::Closed`] when the connection ended.
    pub async fn next(&mut self) -> Result<LinkEvent, WatchError> {
        loop {
            let (msg, _) = self.messages.next().await.ok_or(WatchError::Closed)?;
            if let Some(e) = Self::event(msg.payload) {
                return Ok(e);
            }
        }
    }

    /// Every event already queued, without waiting.
    pub fn drain(&mut self) -> Vec<LinkEvent> {
        let mut out = Vec::new();
        while let Ok((msg, _)) = self.messages.try_recv() {
            out.extend(Self::event(msg.payload));
        }
        out
    }

    fn event(payload: NetlinkPayload<RouteNetlinkMessage>) -> Option<LinkEvent> {
        match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                Some(LinkEvent::of(&m, false))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                Some(LinkEvent::of(&m, true))
            }
            _ => None,
        }
    }
}

/// What one round of attaching did: the interfaces newly attached, or why
/// it failed (the watcher goes on; the next event tries again).
pub type Round = Result<Vec<String>, EnforceError>;

/// Follows the host's links on the current tokio runtime until `stop`
/// resolves: attaches once at the start (what joined before the
/// subscription), then after every batch of link events. `report` sees
/// every round that attached something or failed.
///
/// # Errors
///
/// [`WatchError`] when the subscription fails or ends.
pub async fn follow(
    enforcer: &Enforcer,
    stop: impl Future<Output = ()>,
    report: impl FnMut(Round),
) -> Result<(), WatchError> {
    follow_events(LinkEvents::subscribe()?, enforcer, stop, report).await
}

async fn follow_events(
    mut events: LinkEvents,
    enforcer: &Enforcer,
    stop: impl Future<Output = ()>,
    mut report: impl FnMut(Round),
) -> Result<(), WatchError> {
    let mut round = || {
        let r = enforcer.attach_new_ports();
        if !matches!(&r, Ok(v) if v.is_empty()) {
            report(r);
        }
    };
    round();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            e = events.next() => {
                e?;
                events.drain();
                round();
            }
        }
    }
}

/// A watcher on a thread of its own, for callers without a tokio runtime.
/// Stops when [`PortWatcher::stop`] is called or it is dropped.
#[derive(Debug)]
pub struct PortWatcher {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), WatchError>>>,
}

impl PortWatcher {
    /// Starts the watcher; returns once it is subscribed, so every port that
    /// joins a bridge after this returns is attached on its event.
    ///
    /// # Errors
    ///
    /// [`WatchError`] when the thread or the subscription cannot be made.
    pub fn spawn(
        enforcer: Enforcer,
        report: impl FnMut(Round) + Send + 'static,
    ) -> Result<PortWatcher, WatchError> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), WatchError>>();
        let thread = std::thread::Builder::new()
            .name("sgfw-port-watcher".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(WatchError::Thread)?;
                rt.block_on(async move {
                    // Subscribe here, then say so, then follow.
                    let events = match LinkEvents::subscribe() {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(WatchError::Closed));
                            return Err(e);
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let stop = async move {
                        let _ = stop_rx.await;
                    };
                    follow_events(events, &enforcer, stop, report).await
                })
            })
            .map_err(WatchError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PortWatcher {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            // The thread failed before subscribing: its own error says why.
            _ => Err(match thread.join() {
                Ok(Err(e)) => e,
                Ok(Ok(())) => WatchError::Closed,
                Err(_) => WatchError::Panicked,
            }),
        }
    }

    /// Stops the watcher and waits for its thread.
    ///
    /// # Errors
    ///
    /// The error that ended the watcher early, if one did.
    pub fn stop(mut self) -> Result<(), WatchError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), WatchError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(WatchError::Panicked),
        }
    }
}

impl Drop for PortWatcher {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
