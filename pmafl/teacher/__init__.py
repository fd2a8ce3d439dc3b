"""The teacher's whole life, in one package.

* `settings`: `TeacherSettings`, every setting of a teacher's pre-training, and its cache key;
* `cache`: teacher files and their records in a cache folder, verified on load
  (`load_teacher`), and a vetted teacher's detoxification (`write_vet`, `load_detoxified`);
* `pretrain`: pre-training on the public split (`pretrain_teacher`) and building a missing
  teacher into the cache (`ensure_teacher`);
* `prepare`: a run's teacher, prepared before the run (`prepare_teacher`, `ensure_vet`) and
  loaded by every node (`get_teacher`);
* `cli`: the `pmafl-teacher` command (pretrain, import, show, vet).
"""

from pmafl.teacher.cache import (
    TeacherError,
    cache_folder,
    copy_teacher,
    load_detoxified,
    load_teacher,
    read_record,
    save_teacher,
    teacher_path,
    teacher_record,
    vet_path,
    write_record,
    write_vet,
)
from pmafl.teacher.prepare import ensure_vet, get_teacher, prepare_teacher, vet_summary
from pmafl.teacher.pretrain import ensure_teacher, pretrain_teacher
from pmafl.teacher.settings import TeacherSettings

__all__ = [
    "TeacherError",
    "TeacherSettings",
    "cache_folder",
    "copy_teacher",
    "ensure_teacher",
    "ensure_vet",
    "get_teacher",
    "load_detoxified",
    "load_teacher",
    "prepare_teacher",
    "pretrain_teacher",
    "read_record",
    "save_teacher",
    "teacher_path",
    "teacher_record",
    "vet_path",
    "vet_summary",
    "write_record",
    "write_vet",
]
