//! The importer's record: what a restarted importer concludes from it.

use shmgadget::{Domain, DomainOptions};
use shmgadget_tunnel::record::{Progress, Record, record_name};

#[test]
fn a_record_one_message_behind_the_queue_counts_that_message_as_written() {
    let dir = format!("/dev/shm/sgt-rec-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let opts = DomainOptions { shm_dir: Some(dir.clone().into()), window_size: 1 << 30, ..Default::default() };
    let d = Domain::attach_with("t18rec", &opts).unwrap();
    {
        let r = Record::open(&d, "q").unwrap();
        assert_eq!(r.load(0, None), Progress { stream: 0, last: 0 }, "a fresh record knows no stream");
        r.store(7, 10, 800);
        assert_eq!(r.load(800, None), Progress { stream: 7, last: 10 }, "the queue is where the record says");
        assert_eq!(r.load(880, None), Progress { stream: 7, last: 11 }, "killed between the write and the record");
        // A slot queue one position further, that position a hole (the importer was killed
        // while sending the next message): nothing more was written.
        assert_eq!(r.load(801, Some(800)), Progress { stream: 7, last: 10 }, "killed mid-send: a hole");
        assert_eq!(r.load(801, None), Progress { stream: 7, last: 11 });
        r.store(7, 11, 880);
        r.store(9, 3, 880);
        // Reopened (a restarted importer): the last complete slot.
        let again = Record::open(&d, "q").unwrap();
        assert_eq!(again.load(880, None), Progress { stream: 9, last: 3 });
        assert_eq!(again.written(), 3);
    }
    d.delete_section(&record_name("q")).unwrap();
    d.detach().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
